"""Distributed mode under failure: a real Redis, real worker processes, the real client.

One private ``redis-server`` (broker, results and blobs) and one supervised ``rapbot worker``
(tiny models, 4 threads) serve the whole module; the supervisor restarts the worker when it
dies, as a production process manager would. Faults are injected by photo (see
``workers.faults``, test-only): one photo is "slow" (the task sleeps after storing, before
its ack), one is "poison" (the task kills its worker process).

Settings chosen to keep recovery quick: the visibility timeout is 12 s (above the 10 s hard
limit, as the settings validator demands) and workers look for abandoned messages every second.
A worker restart takes ~10-30 s here (importing torch and friends), which is longer than the
visibility timeout: a message of a killed worker is redelivered by the restarted worker's
start-up scan.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import time

import pytest

from engine.errors import EngineUnavailableError, RepeatedCrashError
from tests.conftest import DREAMBOOTH
from tests.workers_harness import (
    RedisServer,
    WorkerProcess,
    fault_events,
    redis_server_binary,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        redis_server_binary() is None,
        reason="redis-server is not installed (apt-get install redis-server)",
    ),
]

SUBJECTS = sorted(p.name for p in DREAMBOOTH.iterdir() if p.is_dir()) if DREAMBOOTH.is_dir() else []
SLOW_SUBJECT, POISON_SUBJECT = "wolf_plushie", "vase"
SCOPE_SUBJECTS = [s for s in SUBJECTS if s not in (SLOW_SUBJECT, POISON_SUBJECT)][:20]
DELAY_S = 3.0
MAX_REDELIVERIES = 1


def photo(subject: str, size: int = 384) -> bytes:
    """A real DreamBooth photo, downscaled (the engine's work, not JPEG decoding, is tested)."""
    from PIL import Image

    with Image.open(DREAMBOOTH / subject / "00.jpg") as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"real photos not found at {DREAMBOOTH}")
    root = tmp_path_factory.mktemp("workers-failures")
    redis_server = RedisServer(root / "redis").start()
    env = {
        **__import__("os").environ,
        "PYTHONUNBUFFERED": "1",
        "RAPBOT_BROKER_URL": redis_server.url(0),
        "RAPBOT_RESULT_BACKEND": redis_server.url(1),
        "RAPBOT_BLOB_URL": redis_server.url(2),
        "RAPBOT_TASK_SOFT_TIME_LIMIT_S": "8",
        "RAPBOT_TASK_TIME_LIMIT_S": "10",
        "RAPBOT_VISIBILITY_TIMEOUT_S": "12",
        "RAPBOT_RESTORE_INTERVAL_S": "1",
        "RAPBOT_MAX_REDELIVERIES": str(MAX_REDELIVERIES),
        "RAPBOT_TEST_SLOW_SHA256": sha(photo(SLOW_SUBJECT)),
        "RAPBOT_TEST_CRASH_SHA256": sha(photo(POISON_SUBJECT)),
        "RAPBOT_TEST_TASK_DELAY_S": str(DELAY_S),
        "RAPBOT_TEST_FAULT_LOG": str(root / "faults.log"),
    }
    args = ["--profile", "tiny", "--data-dir", str(root / "data"), "--concurrency", "4"]
    worker = WorkerProcess(root / "worker", env, args).start()
    try:
        worker.wait_ready(180)
        yield {"redis": redis_server, "worker": worker, "faults": root / "faults.log"}
    finally:
        worker.stop()
        redis_server.stop()


def gateway(cluster, timeout_s: float):
    from rapbot.settings import WorkerSettings
    from workers.client import CeleryGateway

    redis_server = cluster["redis"]
    settings = WorkerSettings(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        blob_url=redis_server.url(2),
        client_timeout_s=timeout_s,
        publish_retry_s=1.0,
        task_soft_time_limit_s=8,
        task_time_limit_s=10,
        visibility_timeout_s=12,
    )
    return CeleryGateway(settings)


def test_200_concurrent_requests_from_20_scopes_each_get_their_own_answer(cluster) -> None:
    assert len(SCOPE_SUBJECTS) == 20
    photos = {f"tg:{i}": photo(s) for i, s in enumerate(SCOPE_SUBJECTS)}
    names = {scope: f"Subject{i}" for i, scope in enumerate(photos)}

    async def scenario():
        g = gateway(cluster, timeout_s=120)
        try:
            await asyncio.gather(
                *(
                    g.remember(scope, photos[scope], names[scope], "", f"u{scope}", source=scope)
                    for scope in photos
                )
            )
            # Every scope is asked about every name: only its own may come back.
            everyone = "Tell me about " + ", ".join(names.values()) + "."
            calls, expected = [], []
            for i in range(200):
                scope, kind = f"tg:{i % 20}", ("list", "recognize", "list", "ask")[i % 4]
                if kind == "recognize":  # 50 model requests; the rest exercise the plumbing
                    calls.append(g.recognize(scope, photos[scope], "someone"))
                elif kind == "ask":
                    calls.append(g.ask(scope, None, everyone, "someone"))
                else:
                    calls.append(g.list_concepts(scope))
                expected.append((kind, scope))
            started = time.monotonic()
            results = await asyncio.gather(*calls)
            return results, expected, time.monotonic() - started
        finally:
            await g.close()

    results, expected, seconds = asyncio.run(scenario())
    print(f"200 requests in {seconds:.1f} s")
    for result, (kind, scope) in zip(results, expected, strict=True):
        if kind == "list":
            assert [(c.scope, c.name) for c in result] == [(scope, names[scope])]
        else:
            assert [c.name for c in result.concepts] == [names[scope]], (scope, result.text)
        if kind == "recognize":
            assert result.image and result.image[:2] == b"\xff\xd8"  # its annotated JPEG


def test_broker_stopped_while_a_bot_waits_is_a_clear_error_then_recovers(cluster) -> None:
    redis_server, worker = cluster["redis"], cluster["worker"]
    worker_pid = worker.pid
    slow = photo(SLOW_SUBJECT)
    timeout_s = 6.0

    async def scenario():
        g = gateway(cluster, timeout_s=timeout_s)
        try:
            before = len(fault_events(cluster["faults"], "delay"))
            waiting = asyncio.ensure_future(g.recognize("broker", slow, "alice"))
            started = time.monotonic()
            # The worker is in the middle of the request: now the broker goes away.
            await asyncio.to_thread(
                wait_for,
                lambda: len(fault_events(cluster["faults"], "delay")) > before,
                20,
                "the slow request to reach the worker",
            )
            redis_server.stop()
            with pytest.raises(EngineUnavailableError) as failure:
                await waiting
            waited = time.monotonic() - started
            assert "busy or offline" in str(failure.value)
            assert waited <= timeout_s + 1.0, waited
            # While it is down, a new request fails as clearly and as fast.
            down_started = time.monotonic()
            with pytest.raises(EngineUnavailableError):
                await g.list_concepts("broker")
            assert time.monotonic() - down_started <= timeout_s + 1.0

            redis_server.start()  # the same port, empty (no persistence)
            deadline = time.monotonic() + 60
            while True:  # the worker and the client reconnect on their own
                try:
                    concepts = await g.list_concepts("broker")
                    break
                except EngineUnavailableError:
                    assert time.monotonic() < deadline, "no recovery after the broker came back"
            answer = await g.recognize("broker", photo(SCOPE_SUBJECTS[0]), "alice")
            return concepts, answer
        finally:
            await g.close()

    concepts, answer = asyncio.run(scenario())
    assert concepts == []
    assert answer.text
    assert worker.pid == worker_pid, "the worker should survive a broker outage"


def test_worker_killed_in_the_middle_of_remember_finishes_after_restart_once(cluster) -> None:
    worker = cluster["worker"]
    slow = photo(SLOW_SUBJECT)

    async def scenario():
        g = gateway(cluster, timeout_s=150)
        try:
            before = fault_events(cluster["faults"], "delay")
            remembering = asyncio.ensure_future(
                g.remember("kill", slow, "Wolfie", "a plush wolf", "alice", source="tg-msg-1")
            )
            # "In the middle": the concept is stored, the message is not acked yet.
            task_ids = await asyncio.to_thread(
                wait_for,
                lambda: fault_events(cluster["faults"], "delay")[len(before) :],
                30,
                "the remember to be stored and waiting for its ack",
            )
            killed_pid = worker.pid
            worker.kill(signal.SIGKILL)
            result = await remembering
            concepts = await g.list_concepts("kill")
            return task_ids[0], killed_pid, result, concepts
        finally:
            await g.close()

    task_id, killed_pid, result, concepts = asyncio.run(scenario())
    assert -signal.SIGKILL in worker.exit_codes
    assert worker.pid not in (None, killed_pid)
    # The same message ran again on the restarted worker...
    assert fault_events(cluster["faults"], "delay").count(task_id) == 2
    # ...and the platform message id made it store one concept with one photo.
    assert [(c.name, c.examples) for c in concepts] == [("Wolfie", 1)]
    assert result.concept.id == concepts[0].id


def test_poison_photo_ends_in_a_clear_error_after_the_retry_cap(cluster) -> None:
    worker = cluster["worker"]
    poison = photo(POISON_SUBJECT)
    crashes_before = len(fault_events(cluster["faults"], "crash"))

    async def scenario():
        g = gateway(cluster, timeout_s=170)
        try:
            with pytest.raises(RepeatedCrashError) as failure:
                await g.recognize("poison", poison, "mallory")
            # The restarted worker serves everyone else.
            worker.wait_ready(120)
            answer = await g.recognize("poison", photo(SCOPE_SUBJECTS[1]), "alice")
            listed = await g.list_concepts("poison")
            return str(failure.value), answer, listed
        finally:
            await g.close()

    message, answer, listed = asyncio.run(scenario())
    crashes = MAX_REDELIVERIES + 1
    assert message == f"This photo made the engine crash {crashes} times; giving up."
    assert len(fault_events(cluster["faults"], "crash")) - crashes_before == crashes
    assert answer.text and listed == []


def test_command_core_answers_through_the_celery_gateway(cluster) -> None:
    """The chat path end to end: the same command core the adapters use, over Celery."""
    from bots.core.limits import Limits
    from bots.core.request import ChatRequest, CollectingPort, Sender
    from bots.core.serve import CommandCore

    cat = photo(SCOPE_SUBJECTS[2])

    async def scenario():
        g = gateway(cluster, timeout_s=60)
        core = CommandCore(g, limits=Limits(enabled=False))
        try:
            said = []
            for text, image in [
                ("/remember Mochi | my grey cat", cat),
                ("/remember Mochi | my grey cat", cat),  # the platform delivered it twice
                ("/who", cat),
                ("/concepts", None),
                ("/forget Mochi", None),
            ]:
                request = ChatRequest(
                    "tg:core",
                    Sender("alice"),
                    text,
                    photos=(image,) if image else (),
                    message_id="m-1" if image else None,
                )
                said.append(await core.serve(request, CollectingPort()))
            return said
        finally:
            await g.close()

    remembered, again, who, concepts, forgot = asyncio.run(scenario())
    assert not any(r.error for r in (remembered, again, who, concepts, forgot)), [
        r.text for r in (remembered, again, who, concepts, forgot)
    ]
    assert "Mochi" in who.text and who.image and [c.name for c in who.concepts] == ["Mochi"]
    assert "Mochi" in concepts.text and "1 photo" in concepts.text
    assert "Mochi" in forgot.text
