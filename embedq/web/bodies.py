"""The HTTP API's request and response bodies (pydantic): strict, as the schema says."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from embedq.inputs import COLLECTION_RE


def _json_integer(value: Any) -> Any:
    """JSON's integers are numbers without a fraction, 5.0 too; "5" and true are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict (no "5", no true) as the schema says, yet 5.0 passes: JSON Schema calls it an integer.
JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class EmbedBody(BaseModel):
    """``POST /embed``."""

    # Strict: "5" is no integer and 1 no boolean here, as the schema says.
    model_config = ConfigDict(strict=True)

    texts: list[str] = Field(..., description="Texts to embed, in order.")
    normalize: bool = True
    model: str | None = None
    queue: Literal["cpu", "gpu"] | None = Field(None, description="Default: the router picks.")
    traffic: Literal["interactive", "bulk"] | None = Field(
        None,
        description="Traffic class (also the X-Embedq-Traffic header). Default: interactive, "
        "bulk for more than EMBEDQ_INTERACTIVE_MAX_TEXTS texts.",
    )


class EmbedResponse(BaseModel):
    """Vectors in input order; ``truncated`` lists positions cut to the model's max tokens."""

    model: str
    dim: int
    vectors: list[list[float]]
    truncated: list[int]


class OpenAIBody(BaseModel):
    """``POST /v1/embeddings``, as OpenAI's API takes it (token arrays are not accepted)."""

    model_config = ConfigDict(strict=True)

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: JsonInt | None = Field(None, ge=1, description="The model's dimension, if given.")
    user: str | None = None


class SearchBody(BaseModel):
    """``POST /search``."""

    model_config = ConfigDict(strict=True)

    query: str = Field(..., min_length=1)
    collection: str = Field(..., pattern=COLLECTION_RE.pattern)
    k: JsonInt = Field(10, ge=1, le=1000)
    where: dict[str, Any] | None = Field(None, description="A metadata filter (see Where).")
    parents: bool = False


class HitBody(BaseModel):
    """One search hit."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any]
    parent_id: str | None = None
    chunk_index: int | None = None


class SearchResponse(BaseModel):
    """The hits, best first."""

    hits: list[HitBody]


class OpenAIEmbedding(BaseModel):
    """One vector, floats or base64 of little-endian float32."""

    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class OpenAIResponse(BaseModel):
    """OpenAI's embeddings response."""

    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int]


class Health(BaseModel):
    """``GET /health``: ready, or why not."""

    status: str
    workers: int
    redis: dict[str, Any] | None = None
    message: str | None = None
