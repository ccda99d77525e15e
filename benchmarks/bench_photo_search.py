"""Photo search (issue 6): search latency per scope at 1k, 10k and 100k photos, and indexing
throughput, with the ``cpu`` profile's CLIP architecture (ViT-B-32) and random weights.

Indexing: ``Engine.index_photo`` on real photos (decode, embed, thumbnail, SQLite + FAISS), one
photo per call as the chat adapters do, in photos per second. Search: one scope filled with
N random unit vectors (``PhotoStore.add_many``), then per query the store's search alone
(exact inner-product scan, k=10) and the whole ``Engine.search`` for a text query (CLIP text
tower + names lookup + scan), median and p95 in ms.

    python benchmarks/bench_photo_search.py            # 100 queries per size, 64 photos
    python benchmarks/bench_photo_search.py --quick    # 30 queries per size, 16 photos
    python benchmarks/bench_photo_search.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.embedder import load_clip  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.permissions import Actor  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402
from engine.store import open_store  # noqa: E402

PHOTOS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dreambooth"


def _ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1e3, ordered[int(0.95 * (len(ordered) - 1))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries and photos")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--sizes", default="1000,10000,100000", help="photos per scope")
    args = parser.parse_args()
    queries = 30 if args.quick else 100
    n_photos = 16 if args.quick else 64
    sizes = [int(s) for s in args.sizes.split(",")]

    root = Path(tempfile.mkdtemp(prefix="rapbot-bench-photos-"))
    try:
        settings = EngineSettings(data_dir=root, profile="cpu", device=args.device)
        started = time.perf_counter()
        clip = load_clip("ViT-B-32", "", settings)  # random weights: speed, not quality
        print(f"ViT-B-32 (random weights) on {clip.device} in {time.perf_counter() - started:.1f}s")
        store = open_store(root / "store", clip.model_id, clip.dim)
        engine = Engine(settings, SimpleNamespace(embedder=clip, match_threshold=0.8), store)

        files = sorted(PHOTOS.rglob("*.jpg"))[:n_photos]
        if not files:
            raise SystemExit(f"no photos under {PHOTOS}")
        data = [f.read_bytes() for f in files]
        engine.set_indexing("bench-index", True, Actor("admin", is_admin=True))
        engine.index_photo("bench-index", data[0], "u", "warm-up")
        started = time.perf_counter()
        for i, photo in enumerate(data):
            engine.index_photo("bench-index", photo, "u", f"photo-{i}")
        elapsed = time.perf_counter() - started
        print(f"indexing: {len(data) / elapsed:.1f} photos/s ({len(data)} real photos, one a call)")

        rng = np.random.default_rng(0)
        texts = itertools.cycle(["a dog on the sofa", "a red backpack", "a cat at the beach"])
        print(f"{'photos':>8} {'store ms p50':>13} {'p95':>7} {'engine ms p50':>14} {'p95':>7}")
        for size in sizes:
            scope = f"bench-{size}"
            vectors = rng.standard_normal((size, clip.dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for start in range(0, size, 10_000):
                rows = [
                    (vectors[i], b"", "u", 0.0, f"{scope}-{i}")
                    for i in range(start, min(size, start + 10_000))
                ]
                engine.photos.add_many(scope, rows)
            engine.photos.search(scope, vectors[0], 10)  # builds the index
            store_times, engine_times = [], []
            for q in range(queries):
                query = vectors[rng.integers(size)]
                t0 = time.perf_counter()
                engine.photos.search(scope, query, 10)
                store_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine.search(scope, next(texts), k=10)
                engine_times.append(time.perf_counter() - t0)
                del q
            (s50, s95), (e50, e95) = _ms(store_times), _ms(engine_times)
            print(f"{size:>8} {s50:>13.2f} {s95:>7.2f} {e50:>14.2f} {e95:>7.2f}")
        engine.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
