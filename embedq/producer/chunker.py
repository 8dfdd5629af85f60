"""Split long texts into overlapping windows of at most N tokens (``--chunk-tokens``)."""

from __future__ import annotations

from embedq.encode.models import load_tokenizer
from embedq.errors import InvalidInputError


def chunk_spans(text: str, max_tokens: int, overlap: int, model: str) -> list[tuple[int, int]]:
    """Character spans of windows of ``max_tokens`` tokens overlapping by ``overlap``."""
    if max_tokens < 8 or not 0 <= overlap < max_tokens:
        raise InvalidInputError("need --chunk-tokens >= 8 and 0 <= --overlap < --chunk-tokens")
    offsets = load_tokenizer(model)(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    if len(offsets) <= max_tokens:
        return [(0, len(text))]
    step = max_tokens - overlap
    spans = []
    for start in range(0, len(offsets), step):
        window = offsets[start : start + max_tokens]
        spans.append((window[0][0], window[-1][1]))
        if start + max_tokens >= len(offsets):
            break
    return spans
