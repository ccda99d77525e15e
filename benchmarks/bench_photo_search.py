"""Photo search (issues 6, 13): full query latency at 1k, 10k and 100k photos with late fusion
against one summed search in the same run, indexing throughput, what another process's change
costs, and flat vs IVF; the ``cpu`` profile's CLIP architecture (ViT-B-32), random weights.

Indexing: ``Engine.index_photo`` on real photos (decode, embed, thumbnail, SQLite + FAISS), one
photo per call as the chat adapters do, in photos per second. Query latency: one scope filled
with N random unit vectors (``PhotoStore.add_many``), then per query the whole ``Engine.search``
for a reference photo + words ("like this one but ...": decode, embed photo and words, search),
with ``search_fusion=product`` (late fusion: top-200 per part, union reranked from stored
vectors; the default) and ``sum`` (one search with the summed vector), interleaved on the same
store and cached index; p50/p95 in ms and their ratio (target: fusion <= 2x the sum); then the
search stage alone (``composition.search_photos`` on the composed parts).

Foreign change: a second store on the same folder (another process) adds a photo and deletes
another; the time of the next search of the chat whose index is cached here (caught up by id
and the deletion log) against building that index from SQLite.

Flat vs IVF at the largest size: the same photos searched by an exact (flat) index and by IVF
indexes at several ``nprobe`` (the store's default is 32), the first IVF trained (then saved to
``indexes/``, so the others load it: the "build/load s" column), on two kinds of vectors:
``uniform`` (independent random unit vectors: the worst case for IVF) and ``clustered`` (2,000
"scenes", each photo its scene plus noise, cosine ~0.6 within a scene: closer to real photo
embeddings). Recall@10 is the share of the flat index's top 10 that IVF also returns; ``dup@1``
the share of stored vectors that find themselves first when queried as they are.

    python benchmarks/bench_photo_search.py            # 100 queries per size, 64 photos
    python benchmarks/bench_photo_search.py --quick    # 30 queries per size, 16 photos
    python benchmarks/bench_photo_search.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _setup import DREAMBOOTH, scratch_dir  # before engine: puts the repo on sys.path

from engine.composition import search_photos
from engine.embedder import load_clip
from engine.engine import Engine
from engine.permissions import Actor
from engine.settings import EngineSettings
from engine.store import open_store
from engine.store.photos import PhotoStore

PHOTOS = DREAMBOOTH


def _ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1e3, ordered[int(0.95 * (len(ordered) - 1))] * 1e3


def _uniform(rng, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _clustered(rng, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
    """Each vector a random centre plus noise (norm ~0.8): cosine ~0.6 between two of a scene."""
    picks = centres[rng.integers(len(centres), size=n)]
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.8 / np.sqrt(dim))
    vectors = picks + noise
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _fill(photos: PhotoStore, scope: str, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), 10_000):
        rows = [
            (vectors[i], b"", "u", 0.0, f"{scope}-{i}")
            for i in range(start, min(len(vectors), start + 10_000))
        ]
        photos.add_many(scope, rows)


def _measure(store: PhotoStore, scope: str, queries: np.ndarray) -> tuple[float, list, list]:
    """(build seconds, per-query seconds, per-query top-10 sources)."""
    started = time.perf_counter()
    store.count(scope)  # builds the scope's index from SQLite
    build = time.perf_counter() - started
    times, tops = [], []
    for query in queries:
        t0 = time.perf_counter()
        hits = store.search(scope, query, 10)
        times.append(time.perf_counter() - t0)
        tops.append([h.source for h in hits])
    return build, times, tops


def flat_vs_ivf(root: Path, model_id: str, dim: int, size: int, nprobes, args) -> None:
    """Recall@10 of IVF against flat and p50 latency at ``size`` photos (see the module doc)."""
    rng = np.random.default_rng(1)
    n_queries = 50 if args.quick else args.recall_queries
    centres = _uniform(rng, 2_000, dim)
    kinds = {
        "uniform": lambda n: _uniform(rng, n, dim),
        "clustered": lambda n: _clustered(rng, n, dim, centres),
    }
    print(f"\nflat vs IVF at {size} photos, {n_queries} fresh queries (k=10, one thread)")
    print(
        f"{'vectors':>9} {'index':>5} {'nprobe':>6} {'build/load s':>8} {'p50 ms':>7} {'p95 ms':>7}"
        f" {'recall@10':>9} {'dup@1':>6}"
    )
    for kind, make in kinds.items():
        scope = f"recall-{kind}"
        vectors = make(size)
        writer = PhotoStore(root, model_id, dim)
        _fill(writer, scope, vectors)
        writer.close()
        queries = make(n_queries)
        dups = vectors[rng.choice(size, size=n_queries, replace=False)]
        flat = PhotoStore(root, model_id, dim, ivf_threshold=10**9)
        build, times, truth = _measure(flat, scope, queries)
        p50, p95 = _ms(times)
        print(
            f"{kind:>9} {'flat':>5} {'-':>6} {build:>8.2f} {p50:>7.2f} {p95:>7.2f} {1:>9.3f}",
            end="",
        )
        print(f" {_dup_at_1(flat, scope, dups, vectors):>6.3f}")
        flat.close()
        for nprobe in nprobes:
            ivf = PhotoStore(root, model_id, dim, ivf_threshold=2, nprobe=nprobe)
            build, times, tops = _measure(ivf, scope, queries)
            assert ivf.index_kind(scope) == "ivf"
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops, truth, strict=True)])
            p50, p95 = _ms(times)
            print(
                f"{kind:>9} {'ivf':>5} {nprobe:>6} {build:>8.2f} {p50:>7.2f} {p95:>7.2f}"
                f" {recall:>9.3f} {_dup_at_1(ivf, scope, dups, vectors):>6.3f}"
            )
            ivf.close()


def foreign_change(root: Path, model_id: str, dim: int, scope: str, rng) -> None:
    """What another process's change costs the next search of a chat whose index is cached
    here: caught up by id and the deletion log, against building the index from SQLite."""
    here, there = PhotoStore(root, model_id, dim), PhotoStore(root, model_id, dim)
    try:
        size = here.count(scope)  # cached here
        query = _uniform(rng, 1, dim)[0]
        quiet, caught = [], []
        for i in range(20):
            t0 = time.perf_counter()
            here.search(scope, query, 10)
            quiet.append(time.perf_counter() - t0)
            there.add(scope, _uniform(rng, 1, dim)[0], b"", f"poster-{i}", 0.0, f"foreign-{i}")
            there.delete_user(f"poster-{i - 1}")  # the previous one: a logged deletion
            t0 = time.perf_counter()
            here.search(scope, query, 10)
            caught.append(time.perf_counter() - t0)
        fresh = PhotoStore(root, model_id, dim)
        t0 = time.perf_counter()
        fresh.count(scope)
        rebuild = time.perf_counter() - t0
        fresh.close()
    finally:
        here.close()
        there.close()
    (q50, _), (c50, c95) = _ms(quiet), _ms(caught)
    print(
        f"\nforeign change at {size} photos (another process adds a photo, deletes another):"
        f" next search {c50:.1f} ms p50, {c95:.1f} p95 (unchanged: {q50:.1f});"
        f" a new process's first search instead (builds the index, or loads a saved IVF one):"
        f" {rebuild * 1e3:.0f} ms"
    )


def _dup_at_1(store: PhotoStore, scope: str, dups: np.ndarray, vectors: np.ndarray) -> float:
    """Share of stored vectors found first when queried exactly (sources name their row)."""
    found = 0
    for query in dups:
        top = store.search(scope, query, 1)[0]
        row = int(top.source.rsplit("-", 1)[1])
        found += bool(np.array_equal(vectors[row], query))
    return found / len(dups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries and photos")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--sizes", default="1000,10000,100000", help="photos per scope")
    parser.add_argument("--nprobes", default="16,32,64,128", help="IVF lists probed, compared")
    parser.add_argument("--recall-queries", type=int, default=200, help="flat vs IVF queries")
    parser.add_argument("--queries", type=int, default=None, help="queries per size")
    args = parser.parse_args()
    queries = args.queries or (30 if args.quick else 100)
    n_photos = 16 if args.quick else 64
    sizes = [int(s) for s in args.sizes.split(",")]

    root = scratch_dir("photos")
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
        texts = itertools.cycle(["but on the sofa", "with a red backpack", "but at the beach"])
        summed = Engine(settings.model_copy(update={"search_fusion": "sum"}), engine.models, store)
        summed._photos = engine.photos  # the same photo store, the same cached index
        print(
            "\nfull query latency, reference photo + words, k=10 (decode, embed both, search):"
            " late fusion (product, top-200 per part, rerank) vs one summed search, interleaved"
        )
        print(
            f"{'photos':>8} {'index':>6} {'fusion p50':>11} {'p95':>7} {'sum p50':>8} {'p95':>7}"
            f" {'ratio':>6} | search stage: {'fusion':>7} {'sum':>6} ms p50"
        )
        for size in sizes:
            scope = f"bench-{size}"
            vectors = _uniform(rng, size, clip.dim)
            _fill(engine.photos, scope, vectors)
            engine.photos.search(scope, vectors[0], 10)  # builds the index
            fused, plain, fused_stage, plain_stage = [], [], [], []
            for _ in range(queries):
                ref, text = data[int(rng.integers(len(data)))], next(texts)
                for which, times in ((engine, fused), (summed, plain)):
                    t0 = time.perf_counter()
                    which.search(scope, text, ref, k=10)
                    times.append(time.perf_counter() - t0)
                query = engine.compose_query(scope, text, ref)
                for fusion, times in (("product", fused_stage), ("sum", plain_stage)):
                    t0 = time.perf_counter()
                    search_photos(engine.photos, scope, query, 10, fusion=fusion)
                    times.append(time.perf_counter() - t0)
            (f50, f95), (s50, s95) = _ms(fused), _ms(plain)
            fs, ss = _ms(fused_stage)[0], _ms(plain_stage)[0]
            kind = engine.photos.index_kind(scope)
            print(
                f"{size:>8} {kind:>6} {f50:>11.1f} {f95:>7.1f} {s50:>8.1f} {s95:>7.1f}"
                f" {f50 / s50:>6.2f} |               {fs:>7.2f} {ss:>6.2f}"
            )
        foreign_change(root / "photos", clip.model_id, clip.dim, f"bench-{max(sizes)}", rng)
        engine.close()
        nprobes = [int(n) for n in args.nprobes.split(",")]
        flat_vs_ivf(root / "photos", clip.model_id, clip.dim, max(sizes), nprobes, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
