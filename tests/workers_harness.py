"""Real processes for the distributed-mode tests: a private Redis and supervised workers.

:class:`RedisServer` runs ``redis-server`` on a free port (no persistence) so a test can stop
and start "the broker" without touching anyone else's Redis. :class:`WorkerProcess` runs
``python -m rapbot.cli worker`` and, while ``supervise`` is on, restarts it when it dies — as
systemd or a compose ``restart:`` policy would in production. Waits are bounded and poll a
condition (the ready marker, a fault-log line); nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, step_s: float = 0.1):
    """Poll ``condition`` until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--logfile",
             str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self.ping, 10, f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class WorkerProcess:
    """``rapbot worker`` in a subprocess, restarted on death while ``supervise`` is on."""

    def __init__(self, folder: Path, env: dict[str, str], args: list[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.folder / "ready.json"
        self.log_file = self.folder / "worker.log"
        self.env = {**env, "RAPBOT_WORKER_READY_FILE": str(self.ready_file)}
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.exit_codes: list[int] = []
        self.supervise = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> WorkerProcess:
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
            log = open(self.log_file, "a")  # noqa: SIM115 (the child owns it)
            log.write(f"\n===== start {self.starts + 1} at {time.time():.1f}\n")
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rapbot.cli", "worker", *self.args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            self.starts += 1
        if not self._supervisor.is_alive():
            self._supervisor.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                proc = self.proc
                died = proc is not None and proc.poll() is not None
                if died:
                    self.exit_codes.append(proc.returncode)
                    self.proc = None
            if died and self.supervise and not self._stop.is_set():
                self.start()

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def wait_ready(self, timeout_s: float = 120) -> dict:
        import json

        def ready() -> dict | None:
            if self.ready_file.is_file():
                with contextlib.suppress(ValueError):
                    info = json.loads(self.ready_file.read_text())
                    if info.get("pid") == self.pid:
                        return info
            return None

        try:
            return wait_for(ready, timeout_s, "the worker's ready marker", step_s=0.2)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- worker log ---\n{self.log_tail()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, sig)

    def stop(self) -> None:
        self.supervise = False
        self._stop.set()
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def fault_events(path: Path, event: str) -> list[str]:
    """Task ids of the lines ``<event> <task id>`` in a fault log (see workers.faults)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split(" ", 1)[1] for line in lines if line.startswith(event + " ")]
