"""``GET /collections``: the collections a key may reach, with their item counts, bound
model and index (version, freshness, the ``ef`` its build chose and the recall@10 it
measured). Collections outside the key's scope are left out: not even their names show."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from embedq.web.errors import documented
from embedq.web.keys import Authorized

router = APIRouter(tags=["collections"])


class IndexOut(BaseModel):
    """A collection's published index."""

    version: int
    items: int | None = Field(None, description="Items the index holds.")
    built_at: str | None = None
    fresh: bool = Field(..., description="Built from the collection as it is now.")
    behind_s: float | None = Field(None, description="Last write minus the index's snapshot.")
    ef: int | None = Field(None, description="Query breadth its build chose.")
    recall_at_10: float | None = Field(None, description="Recall@10 its build measured at ef.")
    tuned_on: str | None = Field(
        None, description="queries: recent real queries; held_out: stored items held out."
    )


class CollectionOut(BaseModel):
    """One collection."""

    name: str
    items: int
    model: str | None = Field(None, description="The model the collection is bound to.")
    last_write: str | None = None
    index: IndexOut | None = Field(None, description="Null before its first index build.")


class CollectionsResponse(BaseModel):
    """The collections the key may reach, by name."""

    collections: list[CollectionOut]


@router.get(
    "/collections", response_model=CollectionsResponse, responses=documented(401, 429, 502, 503)
)
def list_collections(who: Authorized) -> CollectionsResponse:
    """Every collection this key may reach that holds items."""
    from embedq.ops.status import index_state
    from embedq.search.searcher import get_searcher

    store = get_searcher().store
    found = [s for s in store.states() if who.may(s.collection)]
    out = [_collection(index_state(store, s), store.collection_model(s.collection)) for s in found]
    return CollectionsResponse(collections=sorted(out, key=lambda c: c.name))


def _collection(state: dict[str, Any], model: str | None) -> CollectionOut:
    index = None
    if state["index_version"] is not None:
        index = IndexOut(
            version=state["index_version"],
            items=state["index_items"],
            built_at=state["index_built_at"],
            fresh=state["fresh"],
            behind_s=state["behind_s"],
            ef=state["ef"],
            recall_at_10=state["recall_at_10"],
            tuned_on=state["tuned_on"],
        )
    return CollectionOut(
        name=state["collection"],
        items=state["items"],
        model=model,
        last_write=state["last_write"],
        index=index,
    )
