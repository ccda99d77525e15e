"""``rapbot worker``: start a Celery worker with defaults that suit the machine.

* GPU machine (a worker that serves the gpu queue and sees CUDA): one worker process per GPU
  (``--device cuda:N``; without ``--device`` one child process is started per visible GPU),
  a thread pool of 16 (no fork: CUDA is initialised once, in the process that uses it) and
  micro-batching on, so the 16 concurrent requests share detector and CLIP forwards.
* CPU machine: a thread pool as wide as the machine has cores; micro-batching as configured.
* ``--queues cpu`` alone: a store-only worker (list, rename, describe, forget) that loads no
  model weights at all.

Everything else comes from the environment (``RAPBOT_*``, see README "Distributed mode").
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from rapbot.settings import WorkerSettings, load_settings

log = logging.getLogger(__name__)
GPU_THREADS = 16


@dataclass(frozen=True)
class WorkerPlan:
    queues: tuple[str, ...]
    pool: str
    concurrency: int
    device: str | None  # None: the engine's own choice (RAPBOT_DEVICE, default auto)
    micro_batching: bool | None  # None: leave RAPBOT_MICRO_BATCHING as configured
    gpus_to_spawn: int = 0  # > 1: start one child worker per GPU instead of working here

    @property
    def hostname(self) -> str:
        where = (self.device or "auto").replace(":", "")
        return f"rapbot-{'-'.join(self.queues)}-{where}@%h"

    def celery_argv(self, loglevel: str) -> list[str]:
        return [
            "worker",
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            f"--queues={','.join(self.queues)}",
            f"--hostname={self.hostname}",
            f"--loglevel={loglevel}",
            # Workers never talk to each other: we revoke nothing (stale tasks carry `expires`),
            # so mingle's start-up sync and gossip's event traffic only cost time and messages.
            "--without-mingle",
            "--without-gossip",
        ]


def resolve_queues(text: str, settings: WorkerSettings) -> tuple[str, ...]:
    """``gpu,cpu`` (aliases of the configured queue names) or the configured names."""
    aliases = {"gpu": settings.gpu_queue, "cpu": settings.cpu_queue}
    queues = tuple(dict.fromkeys(aliases.get(q.strip(), q.strip()) for q in text.split(",")))
    known = {settings.gpu_queue, settings.cpu_queue}
    if not queues or any(q not in known for q in queues):
        raise ValueError(f"--queues takes {settings.gpu_queue} and/or {settings.cpu_queue}")
    return queues


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch build with CUDA, no driver: a CPU machine
        return 0


def plan_worker(
    queues: tuple[str, ...],
    settings: WorkerSettings,
    *,
    device: str | None = None,
    concurrency: int | None = None,
    pool: str = "threads",
    gpus: int | None = None,
) -> WorkerPlan:
    serves_models = settings.gpu_queue in queues
    on_gpu = bool(device and device.startswith("cuda"))
    if serves_models and device is None:
        gpus = visible_gpus() if gpus is None else gpus
        if gpus > 1:
            return WorkerPlan(queues, pool, concurrency or GPU_THREADS, None, True, gpus)
        if gpus == 1:
            device, on_gpu = "cuda:0", True
    if on_gpu and serves_models:
        return WorkerPlan(queues, pool, concurrency or GPU_THREADS, device, True)
    return WorkerPlan(queues, pool, concurrency or (os.cpu_count() or 1), device, None)


def _child_env(n: int, metrics_port: int) -> dict[str, str]:
    """GPU child N's environment: its own metrics port (base + N), as each process has its own
    engine and counters; Prometheus scrapes them one by one."""
    env = dict(os.environ)
    if metrics_port > 0:
        env["RAPBOT_METRICS_PORT"] = str(metrics_port + n)
    return env


def _spawn_per_gpu(plan: WorkerPlan, argv_tail: list[str], metrics_port: int = 0) -> int:
    """One child ``rapbot worker --device cuda:N`` per GPU; signals are passed on to them."""
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "rapbot.cli", "worker", "--device", f"cuda:{n}", *argv_tail],
            env=_child_env(n, metrics_port),
        )
        for n in range(plan.gpus_to_spawn)
    ]

    def forward(signum, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def run_worker(
    *,
    queues: str = "gpu,cpu",
    device: str | None = None,
    concurrency: int | None = None,
    pool: str = "threads",
    loglevel: str = "info",
) -> int:
    settings = load_settings()  # the whole configuration, validated before anything starts
    try:
        chosen = resolve_queues(queues, settings)
    except ValueError as error:
        print(f"rapbot: {error}", file=sys.stderr)
        return 2
    plan = plan_worker(chosen, settings, device=device, concurrency=concurrency, pool=pool)
    if plan.gpus_to_spawn > 1:
        tail = [f"--queues={queues}", f"--pool={pool}", f"--loglevel={loglevel}"]
        if concurrency:
            tail.append(f"--concurrency={concurrency}")
        return _spawn_per_gpu(plan, tail, settings.metrics_port)
    if settings.metrics_port > 0:  # this process runs the engine: its metrics
        from engine.errors import RapbotError
        from rapbot.metrics import start_metrics_server

        try:
            start_metrics_server(settings.metrics_port, settings.metrics_addr)
        except OSError as error:
            raise RapbotError(
                f"RAPBOT_METRICS_PORT={settings.metrics_port}: can't serve ({error})"
            ) from None
    # The engine reads its settings from the environment when the worker starts.
    if plan.device:
        os.environ["RAPBOT_DEVICE"] = plan.device
    if plan.micro_batching is not None:
        os.environ.setdefault("RAPBOT_MICRO_BATCHING", "1" if plan.micro_batching else "0")
    log.info("starting worker: %s", plan)
    from workers.app import app

    app.worker_main(plan.celery_argv(loglevel))
    return 0
