"""Search: the ``Index`` seam (hnsw and exact backends), building and publishing indexes,
loading them, and the searcher that answers queries.

``embedq.search(text, collection, ...)`` was a public function before this package existed;
calling the package still searches (see :func:`embedq.search.searcher.search`).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    # Why: ``embedq.search`` names both this package and the public search function.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from embedq.search.searcher import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
