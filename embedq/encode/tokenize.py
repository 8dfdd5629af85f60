"""Backend-neutral tokenizing and padding: every encoder turns texts into ids the same way."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedq.encode.base import Tokenized


def pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into (input_ids, attention_mask) int64 arrays."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=mask.sum())
    return input_ids, mask.astype(np.int64)


def tokenize_texts(tokenizer: Any, texts: list[str], max_tokens: int) -> Tokenized:
    """Token ids of ``texts`` cut to ``max_tokens``; a fast tokenizer's overflow says which
    texts were cut (shared by every backend)."""
    if not texts:
        return Tokenized([], np.zeros(0, dtype=bool))
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_tokens,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    truncated = np.fromiter(
        (len(e.overflowing) > 0 for e in enc.encodings), dtype=bool, count=len(texts)
    )
    return Tokenized(list(enc["input_ids"]), truncated)
