"""Latency the Celery path adds over the in-process path, for the same request, on loopback.

A private ``redis-server`` (broker, results, blobs) and one ``rapbot worker`` run on this
machine; the bot side is timed through the two gateways a bot can use: ``LocalGateway`` (the
engine in-process, on its worker thread) and ``CeleryGateway`` (blob put, publish, worker,
result push, annotated photo fetched back). Calls alternate between the two so that machine
load affects both alike. Requests: ``recognize`` on a real photo (model work, gpu queue) and
``list_concepts`` (store only, cpu queue). Target: p50 overhead under 20 ms.

    python benchmarks/bench_celery_latency.py [--profile tiny] [--requests 200]
    python benchmarks/bench_celery_latency.py --profile cpu --random-weights
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _setup import DREAMBOOTH, ROOT, scratch_dir

PHOTOS = DREAMBOOTH
TARGET_MS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def start_redis(folder: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (or pass --broker-host-port)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    def up() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=0.3).ping())
        except redis.RedisError:
            return False

    wait_until(up, 10, "redis-server")
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--random-weights", action="store_true", help="cpu/gpu without downloads")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per op and path")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--photo", default=str(PHOTOS / "cat" / "00.jpg"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    tmp = scratch_dir("celery")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    redis_proc, port = start_redis(tmp)
    urls = {
        "RAPBOT_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "RAPBOT_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1",
        "RAPBOT_BLOB_URL": f"redis://127.0.0.1:{port}/2",
    }
    engine_env = {
        "RAPBOT_PROFILE": args.profile,
        "RAPBOT_RANDOM_WEIGHTS": "1" if args.random_weights else "0",
        "RAPBOT_DEVICE": args.device,
    }
    ready = tmp / "worker-ready.json"
    worker_env = {
        **os.environ,
        **urls,
        **engine_env,
        "RAPBOT_DATA_DIR": str(tmp / "worker-data"),
        "RAPBOT_WORKER_READY_FILE": str(ready),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rapbot.cli",
            "worker",
            "--concurrency",
            "2",
            "--loglevel",
            "warning",
        ],
        cwd=ROOT,
        env=worker_env,
    )
    try:
        return asyncio.run(run(args, tmp, urls, engine_env, ready, worker))
    finally:
        worker.terminate()
        worker.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


async def run(args, tmp: Path, urls: dict, engine_env: dict, ready: Path, worker) -> int:
    from bots.core.gateway import LocalGateway
    from engine.engine import Engine
    from engine.settings import EngineSettings
    from rapbot.settings import WorkerSettings
    from workers.client import CeleryGateway

    photo = Path(args.photo).read_bytes()
    started = time.perf_counter()
    settings = EngineSettings(
        data_dir=tmp / "local-data",
        profile=engine_env["RAPBOT_PROFILE"],
        random_weights=engine_env["RAPBOT_RANDOM_WEIGHTS"] == "1",
        device=args.device,
    )
    local = LocalGateway(await asyncio.to_thread(Engine.open, settings))
    wait_until(lambda: ready.is_file() or worker.poll() is not None, 600, "the worker")
    if worker.poll() is not None:
        raise SystemExit("the worker exited before it was ready")
    print(f"engine and worker ready in {time.perf_counter() - started:.1f} s")
    celery = CeleryGateway(
        WorkerSettings(
            broker_url=urls["RAPBOT_BROKER_URL"],
            result_backend=urls["RAPBOT_RESULT_BACKEND"],
            blob_url=urls["RAPBOT_BLOB_URL"],
        )
    )
    try:
        for gateway in (local, celery):
            await gateway.remember("bench", photo, "Mochi", "my grey cat", "alice", source="m1")
        ops = {
            "recognize": lambda g: g.recognize("bench", photo, "bob"),
            "list_concepts": lambda g: g.list_concepts("bench"),
        }
        report = {}
        for op, call in ops.items():
            times: dict[str, list[float]] = {"local": [], "celery": []}
            # Wall time minus the engine's own stage times: what the path itself costs, free of
            # the noise of the model forwards on a shared CPU.
            plumbing: dict[str, list[float]] = {"local": [], "celery": []}
            for i in range(args.warmup + args.requests):
                for name, gateway in (("local", local), ("celery", celery)):
                    t0 = time.perf_counter()
                    result = await call(gateway)
                    wall = (time.perf_counter() - t0) * 1000
                    engine_ms = sum(getattr(result, "timings", {}).values()) * 1000
                    if i >= args.warmup:
                        times[name].append(wall)
                        plumbing[name].append(wall - engine_ms)
            row = {}
            for name, values in times.items():
                row[name] = {
                    "p50_ms": round(statistics.median(values), 2),
                    "p99_ms": round(percentile(values, 99), 2),
                }
            row["overhead_p50_ms"] = round(row["celery"]["p50_ms"] - row["local"]["p50_ms"], 2)
            row["overhead_p99_ms"] = round(row["celery"]["p99_ms"] - row["local"]["p99_ms"], 2)
            for q in (50, 99):
                row[f"plumbing_overhead_p{q}_ms"] = round(
                    percentile(plumbing["celery"], q) - percentile(plumbing["local"], q), 2
                )
            report[op] = row
    finally:
        await celery.close()
        await local.close()

    print(f"profile {args.profile}, {args.requests} requests per op and path, loopback Redis")
    print(f"{'op':<14} {'path':<8} {'p50 ms':>8} {'p99 ms':>8}")
    for op, row in report.items():
        for name in ("local", "celery"):
            print(f"{op:<14} {name:<8} {row[name]['p50_ms']:>8.2f} {row[name]['p99_ms']:>8.2f}")
        print(
            f"{op:<14} {'overhead':<8} {row['overhead_p50_ms']:>8.2f} {row['overhead_p99_ms']:>8.2f}"
        )
        print(
            f"{op:<14} {'plumbing':<8} {row['plumbing_overhead_p50_ms']:>8.2f}"
            f" {row['plumbing_overhead_p99_ms']:>8.2f}   (overhead net of engine stage times)"
        )
    worst = max(row["overhead_p50_ms"] for row in report.values())
    verdict = "meets" if worst < TARGET_MS else "MISSES"
    print(f"p50 overhead {worst:.2f} ms: {verdict} the {TARGET_MS:.0f} ms target")
    print(json.dumps(report))
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
