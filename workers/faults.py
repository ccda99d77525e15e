"""TEST-ONLY fault injection for the worker failure tests. Never set these in production.

Faults are keyed by a photo's SHA-256, so one worker can serve normal requests and faulty ones
side by side, and a test can tell which request it is breaking:

``RAPBOT_TEST_CRASH_SHA256``   comma-separated hashes; a task given such a photo kills its
                               worker process at once (``os._exit``), like a segfault in a
                               model forward would: the "poison photo".
``RAPBOT_TEST_SLOW_SHA256``    comma-separated hashes; a task given such a photo sleeps
``RAPBOT_TEST_TASK_DELAY_S``   this long after the engine call, i.e. after the store was
                               written and before the message is acked: the moment a kill
                               tests idempotency.
``RAPBOT_TEST_FAULT_LOG``      a file each fault appends one line to (``crash <task id>`` /
                               ``delay <task id>``) just before it acts, so tests wait for
                               events instead of sleeping blindly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

log = logging.getLogger(__name__)
CRASH_EXIT_CODE = 70


def _hashes(name: str) -> set[str]:
    return {h.strip().lower() for h in os.environ.get(name, "").split(",") if h.strip()}


def _record(event: str, task_id: str) -> None:
    path = os.environ.get("RAPBOT_TEST_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {task_id}\n")
            f.flush()
            os.fsync(f.fileno())


def enabled() -> bool:
    return bool(_hashes("RAPBOT_TEST_CRASH_SHA256") or _hashes("RAPBOT_TEST_SLOW_SHA256"))


def digest(photo: bytes) -> str:
    return hashlib.sha256(photo).hexdigest()


def before_engine(task_id: str, photo_digests: list[str]) -> None:
    """Crash the process when one of the photos is a configured poison photo."""
    if _hashes("RAPBOT_TEST_CRASH_SHA256") & set(photo_digests):
        log.error("TEST FAULT: crashing the worker on a poison photo (task %s)", task_id)
        _record("crash", task_id)
        os._exit(CRASH_EXIT_CODE)


def after_engine(task_id: str, photo_digests: list[str]) -> None:
    """Sleep after the engine call when one of the photos is a configured slow photo."""
    if _hashes("RAPBOT_TEST_SLOW_SHA256") & set(photo_digests):
        delay = float(os.environ.get("RAPBOT_TEST_TASK_DELAY_S", "0") or 0)
        log.warning("TEST FAULT: sleeping %.1f s before acking task %s", delay, task_id)
        _record("delay", task_id)
        time.sleep(delay)
