"""Concept store search latency against brute-force NumPy over the same vectors.

Builds one FAISS store (SQLite + per-scope indexes, through ``add_concepts_bulk``) holding
single scopes of 10, 1k and 100k concepts and 1M vectors spread over 10k scopes, then times
one query at a time (k=5) through ``store.search`` and through NumPy (matrix @ query,
argpartition) over the same scope's vectors in the same run. A query is a "new photo" of a
random stored concept: a unit vector at cosine 0.9 to it. recall@1 is the share of queries
whose best concept is the brute-force one (1.0 for exact flat indexes; IVF is approximate).

    python benchmarks/bench_store.py            # full size (~5 GB of memory, ~6 minutes)
    python benchmarks/bench_store.py --quick    # smoke run: 10, 1k, 10k; 100k over 1k scopes

On a small, busy machine NumPy's multi-threaded BLAS can lose a scheduler slice per call;
``--blas-threads 1`` gives the NumPy baseline one thread, as the store uses for one query.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# BLAS reads its thread count when NumPy is imported, so this option is applied first.
_blas = argparse.ArgumentParser(add_help=False)
_blas.add_argument("--blas-threads", type=int)
if (_threads := _blas.parse_known_args()[0].blas_threads) is not None:
    for _name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = str(_threads)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.store import FaissConceptStore, NewConcept  # noqa: E402
from engine.types import Box  # noqa: E402

CROP = bytes(256)  # a stand-in JPEG: real crops (~20 KB) would only grow the SQLite file
BOX = Box(0, 0, 64, 64)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def near(rng: np.random.Generator, v: np.ndarray, cos: float = 0.9) -> np.ndarray:
    """A unit vector at cosine ``cos`` to unit vector ``v``."""
    r = rng.standard_normal(v.shape[0]).astype(np.float32)
    r -= (r @ v) * v
    r /= np.linalg.norm(r)
    return (cos * v + np.sqrt(1 - cos * cos) * r).astype(np.float32)


def brute_force(matrix: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k best inner products, best first."""
    scores = matrix @ q
    n = len(scores)
    top = np.argpartition(-scores, k - 1)[:k] if n > k else np.arange(n)
    return top[np.argsort(-scores[top])]


def load(store: FaissConceptStore, scope: str, vectors: np.ndarray) -> list[str]:
    """Bulk-add one concept per vector; returns the concept ids in row order."""
    items = [NewConcept(f"c{i}", v, CROP, BOX, "", "thing", "bench") for i, v in enumerate(vectors)]
    return [c.id for c in store.add_concepts_bulk(scope, items)]


def measure(store, picks, k: int) -> dict[str, float]:
    """Time store.search and NumPy on the same queries; picks = [(scope, matrix, ids, q)].

    Two separate passes, so that BLAS threads still spinning after a NumPy call do not
    steal the CPU from the store's next query (or the other way round).
    """
    store_ms, numpy_ms, agree = [], [], 0
    found = []
    for scope, _, _, q in picks:
        t0 = time.perf_counter()
        hits = store.search(scope, q, k)[0]
        store_ms.append((time.perf_counter() - t0) * 1e3)
        found.append(hits[0].concept_id if hits else None)
    for (_, matrix, ids, q), best_store in zip(picks, found, strict=True):
        t0 = time.perf_counter()
        best = brute_force(matrix, q, k)
        numpy_ms.append((time.perf_counter() - t0) * 1e3)
        agree += best_store == ids[best[0]]
    s50, s99 = np.percentile(store_ms, [50, 99])
    n50, n99 = np.percentile(numpy_ms, [50, 99])
    return {"s50": s50, "s99": s99, "n50": n50, "n99": n99, "recall": agree / len(picks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (512)")
    parser.add_argument("--queries", type=int, default=0, help="queries per row (1000; quick 300)")
    parser.add_argument("--k", type=int, default=5, help="results per query (5)")
    parser.add_argument("--dir", type=Path, help="store folder to use and keep (default: temp)")
    parser.add_argument("--blas-threads", type=int, help="NumPy BLAS threads (default: BLAS's)")
    args = parser.parse_args()

    dim, k = args.dim, args.k
    singles = [10, 1_000, 10_000] if args.quick else [10, 1_000, 100_000]
    n_scopes, per_scope = (1_000, 100) if args.quick else (10_000, 100)
    n_queries = args.queries or (300 if args.quick else 1_000)
    console = Console()
    if not console.is_terminal:  # piped output: keep the table on one line per row
        console = Console(width=140)
    rng = np.random.default_rng(0)
    root = args.dir or Path(tempfile.mkdtemp(prefix="rapbot-bench-store-"))
    console.print(
        f"dim {dim}, k {k}, {n_queries} queries per row, faiss {faiss.__version__},"
        f" {os.cpu_count()} CPUs, OpenMP threads {faiss.omp_get_max_threads()},"
        f" BLAS threads {args.blas_threads or 'default'},"
        f" load average {os.getloadavg()[0]:.2f}, store {root}"
    )

    rows: list[tuple[str, int, dict[str, float]]] = []
    builds: list[str] = []
    store = FaissConceptStore(root, "bench:random", dim)
    try:
        for n in singles:
            scope = f"single:{n}"
            matrix = unit_rows(rng, n, dim)
            t0 = time.perf_counter()
            ids = load(store, scope, matrix)
            builds.append(f"{scope}: {n:,} concepts in {time.perf_counter() - t0:.1f} s")
            picks = []
            for _ in range(n_queries):
                row = int(rng.integers(n))
                picks.append((scope, matrix, ids, near(rng, matrix[row])))
            kind = store._sync(scope).kind  # noqa: SLF001 - reported, not relied on
            rows.append((f"1 scope, {n:,} concepts ({kind})", n, measure(store, picks, k)))

        total = n_scopes * per_scope
        big = unit_rows(rng, total, dim)  # scope i owns rows [i * per_scope, (i + 1) * per_scope)
        t0 = time.perf_counter()
        many_ids = []
        for i in range(n_scopes):
            many_ids.append(load(store, f"many:{i}", big[i * per_scope : (i + 1) * per_scope]))
            if (i + 1) % max(1, n_scopes // 10) == 0:
                console.print(f"  loaded {i + 1:,}/{n_scopes:,} scopes", style="dim")
        builds.append(
            f"{n_scopes:,} scopes x {per_scope}: {total:,} vectors in"
            f" {time.perf_counter() - t0:.1f} s"
        )

        def many_picks() -> list:
            picks = []
            for _ in range(n_queries):
                i = int(rng.integers(n_scopes))
                matrix = big[i * per_scope : (i + 1) * per_scope]
                q = near(rng, matrix[int(rng.integers(per_scope))])
                picks.append((f"many:{i}", matrix, many_ids[i], q))
            return picks

        label = f"{n_scopes:,} scopes, {total:,} vectors"
        rows.append((f"{label} (warm)", per_scope, measure(store, many_picks(), k)))
        store.close()
        # Cold: a fresh process state; the first query of each scope reads its index file.
        store = FaissConceptStore(root, "bench:random", dim)
        rows.append((f"{label} (cold reopen)", per_scope, measure(store, many_picks(), k)))
        db_size = (root / "concepts.sqlite3").stat().st_size
    finally:
        store.close()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    table = Table(title=f"Concept store search, one query at a time (dim {dim}, k {k})")
    # warm: every index in memory; cold: a reopened store, so the first query of a scope
    # reads its index file; random scope per query.
    for column in ("setup", "in scope", "store p50 ms", "store p99 ms", "NumPy p50 ms"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for column in ("NumPy p99 ms", "NumPy/store p50", "recall@1"):
        table.add_column(column, justify="right")
    for label, size, m in rows:
        table.add_row(
            label,
            f"{size:,}",
            f"{m['s50']:.3f}",
            f"{m['s99']:.3f}",
            f"{m['n50']:.3f}",
            f"{m['n99']:.3f}",
            f"{m['n50'] / m['s50']:.1f}x",
            f"{m['recall']:.3f}",
        )
    console.print(table)
    for line in builds:
        console.print(f"build (SQLite + index, bulk): {line}")
    console.print(f"SQLite file: {db_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
