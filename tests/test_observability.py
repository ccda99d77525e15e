"""Logs and metrics (rapbot.logs, rapbot.metrics): real requests, a real Redis, real HTTP.

Metrics live in one registry per process and other tests add to them too, so every assertion
compares a value before and after (a delta), never an absolute count that others could change.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import urllib.request
import uuid
from datetime import datetime
from types import SimpleNamespace

import pytest

from bots.core.gateway import LocalGateway
from bots.core.limits import Limits
from bots.core.request import CollectingPort
from bots.core.serve import TIMEOUT_TEXT, CommandCore
from engine.errors import EngineUnavailableError, ImageError, StoreError, UnknownConceptError
from engine.permissions import Actor
from engine.types import Answer, ConceptSheet
from rapbot import logs, metrics
from rapbot.metrics import metrics_text
from tests.conftest import REPO_ROOT
from tests.metric_samples import metric as value
from tests.test_core import DownloadCountingPort, handle, request

REDIS_URL = "redis://127.0.0.1:6379/15"  # a database of its own; keys named per test run


def store_items(kind: str) -> float:
    """``rapbot_store_items{kind}`` counted now (a scrape reuses counts up to a minute old)."""
    metrics.expire_store_counts()
    return value("rapbot_store_items", kind=kind)


class RecordingGateway(LocalGateway):
    """The local gateway, keeping the Answers it hands the core (to compare timings with)."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.answers: list[Answer] = []

    async def recognize(self, scope, image, user=None):
        answer = await super().recognize(scope, image, user)
        self.answers.append(answer)
        return answer


@pytest.fixture
def json_logs():
    """rapbot's JSON handler on the root logger, writing into a StringIO; restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    handler = logs.configure_logging("INFO", "json")
    stream = io.StringIO()
    handler.setStream(stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    for saved in saved_handlers:
        if saved not in root.handlers:
            root.addHandler(saved)
    root.setLevel(saved_level)


# ----------------------------------------------------------------------------- requests


def test_who_request_counts_times_its_stages_and_engine_metrics(tiny_engine, dreambooth) -> None:
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()
    gateway = RecordingGateway(tiny_engine)  # registers the engine
    core = CommandCore(gateway)
    ok = {"command": "who", "outcome": "ok"}
    before_who = value("rapbot_requests_total", **ok)
    before_who_seconds = value("rapbot_request_seconds_count", command="who")
    before_concepts = store_items("concepts")
    before_examples = store_items("examples")

    async def scenario():
        remembered = await handle(core, "/remember Mochi | my grey cat", image=cat)
        stages_before = {
            stage: (
                value("rapbot_stage_seconds_count", stage=stage),
                value("rapbot_stage_seconds_sum", stage=stage),
            )
            for stage in ("decode", "detect", "embed", "search", "render")
        }
        who = await handle(core, "/who", image=cat, user="bob")
        gateway._executor.shutdown(wait=True)
        return remembered, stages_before, who

    remembered, stages_before, who = asyncio.run(scenario())
    assert not remembered.error and not who.error and "Mochi" in who.text

    assert value("rapbot_requests_total", **ok) == before_who + 1
    assert value("rapbot_request_seconds_count", command="who") == before_who_seconds + 1
    assert value("rapbot_requests_total", command="remember", outcome="ok") >= 1
    text = metrics_text()
    assert f'rapbot_requests_total{{command="who",outcome="ok"}} {before_who + 1}' in text

    # One stage-histogram sample per stage of the answer, with the answer's own seconds.
    (answer,) = gateway.answers
    assert {"decode", "detect", "embed", "render"} <= set(answer.timings)
    for stage, seconds in answer.timings.items():
        count, total = stages_before.get(stage, (0.0, 0.0))
        assert value("rapbot_stage_seconds_count", stage=stage) == count + 1
        assert value("rapbot_stage_seconds_sum", stage=stage) == pytest.approx(total + seconds)
        assert f'rapbot_stage_seconds_bucket{{le="+Inf",stage="{stage}"}}' in text

    # Scrape-time engine metrics: the models' load time and what the store holds now.
    assert value("rapbot_model_load_seconds", model="tiny") > 0
    assert 'rapbot_model_load_seconds{model="tiny"}' in text
    assert store_items("concepts") == before_concepts + 1
    assert store_items("examples") == before_examples + 1
    assert tiny_engine.store.count_concepts() == 1


def test_errors_limits_and_unknown_commands_have_their_outcomes(tiny_engine) -> None:
    core = CommandCore(LocalGateway(tiny_engine), limits=Limits(user_burst=1, user_per_minute=1))
    keys = [
        ("who", "user_error"),  # no photo: an error reply from dispatch
        ("unknown", "user_error"),  # does not parse
        ("forget", "user_error"),  # UnknownConceptError
        ("concepts", "ok"),
        ("concepts", "rate_limited"),
    ]
    before = {key: value("rapbot_requests_total", command=key[0], outcome=key[1]) for key in keys}

    async def scenario() -> list:
        replies = [
            await handle(core, "/who", user="u1"),
            await handle(core, "/frobnicate", user="u2"),
            await handle(core, "/forget Nobody", user="u3"),
            await handle(core, "/concepts", user="u4"),
            await handle(core, "/concepts", user="u4"),  # its one token is spent
            await handle(core, "/concepts", user="u5", from_bot=True),  # not counted
        ]
        core.gateway._executor.shutdown(wait=True)
        return replies

    replies = asyncio.run(scenario())
    assert [r.error for r in replies[:5]] == [True, True, True, False, True]
    assert replies[5] is None
    for key in keys:
        assert value("rapbot_requests_total", command=key[0], outcome=key[1]) == before[key] + 1


class GatedGateway:
    """A stand-in gateway whose listing waits until released (or forever)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def list_concepts(self, scope):
        self.entered.set()
        await self.release.wait()
        return []

    async def concept_sheet(self, scope, page=1):  # what /concepts asks for
        return ConceptSheet(await self.list_concepts(scope), 1, 1, 0)


def test_refusals_are_counted_under_the_command_name() -> None:
    """Admission is part of serve(): a refused request (rate limit, busy chat) is counted
    once, under its command's name, and downloads nothing."""
    keys = [
        ("concepts", "ok"),
        ("concepts", "rate_limited"),
        ("who", "busy"),
    ]
    before = {key: value("rapbot_requests_total", command=key[0], outcome=key[1]) for key in keys}
    seconds_before = {
        name: value("rapbot_request_seconds_count", command=name) for name in ("concepts", "who")
    }
    other_outcomes = [
        (command, outcome)
        for command in ("concepts", "who", "help")
        for outcome in metrics.REQUEST_OUTCOMES
        if (command, outcome) not in keys
    ]
    others_before = {
        k: value("rapbot_requests_total", command=k[0], outcome=k[1]) for k in other_outcomes
    }

    async def scenario() -> list:
        gateway = GatedGateway()
        core = CommandCore(
            gateway, limits=Limits(user_burst=1, user_per_minute=1, in_flight_per_chat=1)
        )
        gateway.release.set()
        results = [await handle(core, "/concepts", user="u1")]
        results.append(await handle(core, "/concepts", user="u1"))  # its one token is spent
        # The chat's one in-flight slot is taken by a request still being answered.
        gateway.entered.clear()
        gateway.release.clear()
        slow = asyncio.create_task(handle(core, "/concepts", user="u2", scope="tg:2"))
        await gateway.entered.wait()
        port = DownloadCountingPort()
        results.append(await handle(core, "/who", user="u3", scope="tg:2", image=b"x", port=port))
        gateway.release.set()
        results.append(await slow)
        return results, port.downloads

    (handled, limited, busy, slow), downloads = asyncio.run(scenario())
    assert not handled.error and not slow.error
    assert limited.error and limited.text.startswith("Slow down a little")
    assert busy.error and "still working" in busy.text and downloads == 0
    assert value("rapbot_requests_total", command="concepts", outcome="ok") == (
        before[("concepts", "ok")] + 2
    )
    for key in keys[1:]:
        assert value("rapbot_requests_total", command=key[0], outcome=key[1]) == before[key] + 1
    # Every request timed once: the two answered, the refused one; /who was refused only.
    assert value("rapbot_request_seconds_count", command="concepts") == (
        seconds_before["concepts"] + 3
    )
    assert value("rapbot_request_seconds_count", command="who") == seconds_before["who"] + 1
    for key, count in others_before.items():  # nothing counted twice or under another outcome
        assert value("rapbot_requests_total", command=key[0], outcome=key[1]) == count


def test_a_request_over_its_time_limit_is_a_timeout() -> None:
    """serve() bounds each request (the adapter's time limit): the request is answered,
    counted once with outcome timeout and timed; its in-flight slot is given back; a request
    the adapter cancels itself (a shutdown) is counted the same way."""
    timeout = {"command": "concepts", "outcome": "timeout"}
    before = value("rapbot_requests_total", **timeout)
    count_before = value("rapbot_request_seconds_count", command="concepts")
    sum_before = value("rapbot_request_seconds_sum", command="concepts")
    ok_before = value("rapbot_requests_total", command="concepts", outcome="ok")

    async def scenario() -> list:
        core = CommandCore(GatedGateway(), limits=Limits(in_flight_per_chat=1), time_limit_s=0.2)
        first = await handle(core, "/concepts")
        second = await handle(core, "/concepts", user="u2")  # the slot was given back
        core.time_limit_s = None
        with pytest.raises(asyncio.TimeoutError):  # the adapter's own cancellation
            await asyncio.wait_for(core.serve(request("/concepts"), CollectingPort()), 0.2)
        return [first, second]

    replies = asyncio.run(scenario())
    assert [r.text for r in replies] == [TIMEOUT_TEXT, TIMEOUT_TEXT]
    assert value("rapbot_requests_total", **timeout) == before + 3
    assert value("rapbot_request_seconds_count", command="concepts") == count_before + 3
    assert value("rapbot_request_seconds_sum", command="concepts") >= sum_before + 0.6
    assert value("rapbot_requests_total", command="concepts", outcome="ok") == ok_before
    assert "timeout" in metrics.REQUEST_OUTCOMES


class FailingDownloads(CollectingPort):
    """A port whose downloads fail as a platform's do: the user's file, the platform, a hang."""

    def __init__(self, failure: BaseException | None) -> None:
        super().__init__()
        self.failure = failure

    async def download(self, photo):
        if self.failure is None:
            await asyncio.sleep(60)
        raise self.failure


def test_requests_ended_by_their_download_are_counted_under_their_command() -> None:
    """A request whose photo cannot be had is counted once, under its command's name, with
    the outcome the error declares (the user's file, or the platform's failure)."""
    cases = [
        ("/remember Mochi | my cat", "remember", "user_error", ImageError("not an image")),
        ("/who", "who", "internal_error", EngineUnavailableError("Telegram is down")),
        ("/who@rapbot_test_bot", "who", "timeout", None),
        ("/frobnicate", "unknown", "user_error", ImageError("never downloaded")),
    ]
    for text, name, outcome, failure in cases:
        core = CommandCore(GatedGateway(), time_limit_s=0.2)
        before = value("rapbot_requests_total", command=name, outcome=outcome)
        timed = value("rapbot_request_seconds_count", command=name)
        reply = asyncio.run(handle(core, text, image=b"x", port=FailingDownloads(failure)))
        assert reply.error
        assert value("rapbot_requests_total", command=name, outcome=outcome) == before + 1
        assert value("rapbot_request_seconds_count", command=name) == timed + 1


def test_outcomes_of_errors_and_command_names() -> None:
    assert metrics.error_outcome(UnknownConceptError("x")) == "user_error"
    assert metrics.error_outcome(StoreError("x")) == "internal_error"
    assert metrics.error_outcome(RuntimeError("x")) == "internal_error"
    from bots.core import commands as c

    assert metrics.command_name(c.ForgetMe()) == "forget_me"
    assert metrics.command_name(c.Who()) == "who"
    assert metrics.command_name(None) == "unknown"


def test_streamed_answers_feed_the_stage_histogram(tiny_engine, dreambooth) -> None:
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()
    core = CommandCore(LocalGateway(tiny_engine), stream_interval=0)
    decode_before = value("rapbot_stage_seconds_count", stage="decode")
    ask_before = value("rapbot_requests_total", command="ask", outcome="ok")

    async def scenario():
        port = CollectingPort(streaming=True)
        reply = await handle(core, "/ask who is this?", image=cat, port=port)
        core.gateway._executor.shutdown(wait=True)
        return reply

    assert not asyncio.run(scenario()).error
    assert value("rapbot_stage_seconds_count", stage="decode") == decode_before + 1
    assert value("rapbot_requests_total", command="ask", outcome="ok") == ask_before + 1


def test_photo_and_batching_metrics_over_a_registered_engine(tiny_models, tmp_path, dreambooth):
    from engine.engine import Engine
    from engine.models import close_batchers, with_micro_batching
    from engine.store import open_store

    settings, models = tiny_models
    batched = with_micro_batching(models, max_batch=4, max_wait_ms=1)
    store = open_store(tmp_path / "store", models.embedder.model_id, models.embedder.dim)
    engine = Engine(settings.model_copy(update={"data_dir": tmp_path}), batched, store)
    photos_before = store_items("photos")
    batches_before = value("rapbot_batches_total", model="clip-images")
    items_before = value("rapbot_batched_items_total", model="clip-images")
    try:
        metrics.register_engine(engine)
        metrics.register_engine(engine)  # once per engine: nothing counted twice
        cat = (dreambooth / "cat" / "00.jpg").read_bytes()
        engine.set_indexing("tg:9", True, Actor("admin", is_admin=True))
        engine.index_photo("tg:9", cat, "bob", "msg-1")
        stats = batched.embedder.images.stats()
        assert stats.items >= 1
        assert store_items("photos") == photos_before + 1
        assert value("rapbot_batches_total", model="clip-images") == batches_before + stats.batches
        assert (
            value("rapbot_batched_items_total", model="clip-images") == items_before + stats.items
        )
        assert value("rapbot_batch_max_size", model="clip-images") >= stats.max_size >= 1
    finally:
        close_batchers(batched)
        engine.close()
    # A closed engine's stores are skipped, never a failed scrape.
    assert "rapbot_requests_total" in metrics_text()


class CountingStore:
    """A store whose exact counts are queries: each one is recorded."""

    def __init__(self, examples: int, concepts: int) -> None:
        self.examples, self.concepts = examples, concepts
        self.queries = 0

    def count(self) -> int:
        self.queries += 1
        return self.examples

    def count_concepts(self) -> int:
        self.queries += 1
        return self.concepts


class CountingPhotos:
    def __init__(self, photos: int) -> None:
        self.photos = photos
        self.queries = 0

    def total(self) -> int:
        self.queries += 1
        return self.photos


class FakeEngine:
    """What the engine collector looks at: models (in memory), a store and a photo index."""

    def __init__(self, store, photos, load_seconds: float) -> None:
        self.store, self.photos = store, photos
        self.models = SimpleNamespace(
            profile=SimpleNamespace(name="fake"),
            embedder=None,
            detector=None,
            generator=None,
            load_seconds=load_seconds,
        )

    def loaded_parts(self):
        from engine.engine import EngineParts

        return EngineParts(self.models, self.store, self.photos)


def samples(collector: metrics.EngineCollector) -> dict[tuple[str, tuple], float]:
    """One scrape of ``collector``: (sample name, label values) → value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_store_counts_are_reused_for_a_minute_and_models_stay_live() -> None:
    now = [1000.0]
    collector = metrics.EngineCollector(store_ttl_s=60.0, clock=lambda: now[0])
    store, photos = CountingStore(examples=5, concepts=2), CountingPhotos(7)
    engine = FakeEngine(store, photos, load_seconds=1.5)
    collector.add(engine)
    stored = lambda kind: ("rapbot_store_items", (("kind", kind),))  # noqa: E731
    loaded = ("rapbot_model_load_seconds", (("model", "fake"),))

    first = samples(collector)
    assert (store.queries, photos.queries) == (2, 1)
    assert first[stored("examples")] == 5 and first[stored("concepts")] == 2
    assert first[stored("photos")] == 7 and first[loaded] == 1.5

    # A scrape within the minute: no store query, the last counts; the models are read again.
    store.examples, photos.photos, engine.models.load_seconds = 6, 8, 2.5
    now[0] += 59.0
    second = samples(collector)
    assert (store.queries, photos.queries) == (2, 1)
    assert second[stored("examples")] == 5 and second[stored("photos")] == 7
    assert second[loaded] == 2.5

    # Once the minute is over: counted again.
    now[0] += 1.0
    third = samples(collector)
    assert (store.queries, photos.queries) == (4, 2)
    assert third[stored("examples")] == 6 and third[stored("photos")] == 8
    samples(collector)
    assert (store.queries, photos.queries) == (4, 2)

    # Another engine's stores count from the next scrape on; and counts can be expired.
    other_store = CountingStore(examples=1, concepts=1)
    other = FakeEngine(other_store, None, load_seconds=1.0)
    collector.add(other)
    assert samples(collector)[stored("examples")] == 7
    assert (store.queries, other_store.queries) == (6, 2)
    collector.add(other)  # already there: the counts stay
    samples(collector)
    assert store.queries == 6
    collector.expire_store_counts()
    samples(collector)
    assert store.queries == 8


def test_redis_urls_for_the_queue_depth_and_the_broker_settings() -> None:
    from rapbot.settings import is_redis_url

    for url in ("redis://h:6379/0", "rediss://h/0", "unix:///run/redis.sock"):
        assert is_redis_url(url) and is_redis_url(url, sentinel=False)
    assert is_redis_url("sentinel://h:26379") and not is_redis_url("sentinel://h", sentinel=False)
    assert not is_redis_url("amqp://guest@h//") and not is_redis_url("memory://")
    # The queue depth opens the URL with redis-py: the first of a failover list, no Sentinel.
    assert metrics._redis_url(" redis://a/0 ; redis://b/0") == "redis://a/0"
    assert metrics._redis_url("sentinel://h:26379;sentinel://h2:26379") is None
    assert metrics._redis_url("amqp://guest@h//") is None


def test_metrics_modules_import_without_torch() -> None:
    code = (
        "import sys, rapbot.metrics, rapbot.observability, bots.core.serve\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(rapbot.metrics.metrics_text().count('# TYPE'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 5  # requests, request seconds, stages, tasks, task seconds


# ----------------------------------------------------------------------------- serving


def test_http_server_serves_the_registry() -> None:
    metrics.observe_request("help", "ok", 0.01)
    server, _thread = metrics.start_metrics_server(0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
        assert "# TYPE rapbot_requests_total counter" in body
        assert 'rapbot_requests_total{command="help",outcome="ok"}' in body
        assert "python_gc_objects_collected_total" not in body  # only our registry
    finally:
        metrics.stop_metrics_server(server)


def test_setup_configures_logs_and_serves_metrics(json_logs) -> None:
    from rapbot.observability import setup

    with pytest.raises(ValueError):
        setup("INFO", "xml", 0)
    root = logging.getLogger()
    setup("warning", "json", 0)  # no port: no server
    assert root.level == logging.WARNING
    assert [h for h in root.handlers if getattr(h, "rapbot_handler", False)] == [logs.configured()]


# ----------------------------------------------------------------------------- queue depth


@pytest.fixture
def redis_db():
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"Redis is not answering at {REDIS_URL}")
    name = f"rapbot-test-{uuid.uuid4().hex[:12]}"
    yield client, name
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)
    client.close()


def test_queue_depth_counts_waiting_messages_of_every_priority(redis_db) -> None:
    from kombu import Connection, Exchange, Queue

    from rapbot.settings import WorkerSettings
    from workers.app import create_app

    client, name = redis_db
    app = create_app(WorkerSettings(broker_url=REDIS_URL, gpu_queue=name, cpu_queue=f"{name}-cpu"))
    options = app.conf.broker_transport_options
    collector = metrics.register_queues(REDIS_URL, [name, f"{name}-cpu"], options)
    try:
        assert collector is not None
        assert metrics.register_queues(REDIS_URL, [name, f"{name}-cpu"], options) is collector
        assert value("rapbot_queue_depth", queue=name) == 0
        queue = Queue(name, Exchange(name), routing_key=name)
        with Connection(REDIS_URL, transport_options=options) as connection:
            producer = connection.Producer()
            for priority in (None, None, 9):
                producer.publish(
                    {"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue],
                    priority=priority, retry=False,
                )  # fmt: skip
        # kombu's layout, as the collector reads it: the list itself and a priority sub-list.
        assert client.llen(name) == 2
        assert client.llen(f"{name}\x06\x169") == 1
        assert value("rapbot_queue_depth", queue=name) == 3
        assert value("rapbot_queue_depth", queue=f"{name}-cpu") == 0
        assert value("rapbot_broker_up") == 1
        assert f'rapbot_queue_depth{{queue="{name}"}} 3.0' in metrics_text()
    finally:
        metrics.unregister(collector)
    assert f'queue="{name}"' not in metrics_text()


def test_a_dead_broker_does_not_break_the_scrape() -> None:
    from tests.workers_harness import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    collector = metrics.register_queues(url, ["gpu", "cpu"])
    try:
        text = metrics_text()  # no exception
        assert "rapbot_broker_up 0.0" in text
        assert [m.name for m in collector.collect()] == ["rapbot_broker_up"]
    finally:
        metrics.unregister(collector)
    assert metrics.register_queues("amqp://guest@127.0.0.1//", ["gpu"]) is None  # not Redis
    assert metrics.redis_queue_keys("q") == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]


# ----------------------------------------------------------------------------- logs


def test_json_logs_carry_the_context_only_inside_it(json_logs) -> None:
    log = logging.getLogger("rapbot.test")
    with logs.log_context(scope="tg:42", task_id="task-1"):
        log.info("inside")
        with logs.log_context(command="who"):
            log.info("nested")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.info("outside")
    inside, nested, failed, outside = json_logs()
    assert inside["message"] == "inside" and inside["logger"] == "rapbot.test"
    assert inside["level"] == "INFO"
    assert inside["scope"] == "tg:42" and inside["task_id"] == "task-1"
    assert "command" not in inside and nested["command"] == "who"
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exc"]
    assert outside["message"] == "outside"
    assert not {"scope", "task_id", "command", "exc"} & set(outside)
    ts = datetime.fromisoformat(inside["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset().total_seconds() == 0 and inside["ts"].endswith("Z")


def test_configure_logging_is_idempotent_and_text_shows_the_context(json_logs) -> None:
    root = logging.getLogger()
    handler = logs.configure_logging("DEBUG", "text")
    assert logs.configure_logging("DEBUG", "text") is handler
    assert [h for h in root.handlers if getattr(h, "rapbot_handler", False)] == [handler]
    stream = io.StringIO()
    handler.setStream(stream)
    with logs.log_context(scope="dc:7", task_id="t9"):
        logging.getLogger("rapbot.test").debug("hello")
    logging.getLogger("rapbot.test").debug("bye")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("DEBUG rapbot.test [scope=dc:7 task=t9]: hello")
    assert second.endswith("DEBUG rapbot.test: bye")
    with pytest.raises(ValueError):
        logs.configure_logging("LOUD")
    with pytest.raises(TypeError), logs.log_context(user="alice"):  # ids it knows only
        pass


class LoggingEngine:
    """A stand-in engine whose operations log (as the real one's modules do)."""

    def list_concepts(self, scope):
        logging.getLogger("engine.test").info("listing")
        return []

    def concept_sheet(self, scope, page=1):  # what /concepts asks for
        return ConceptSheet(self.list_concepts(scope), 1, 1, 0)

    def forget(self, scope, name, actor):
        raise UnknownConceptError("There is no Nobody in this chat.")


def test_engine_thread_logs_carry_the_requests_scope_and_command(json_logs) -> None:
    async def scenario():
        core = CommandCore(LocalGateway(LoggingEngine()))
        reply = await handle(core, "/concepts", scope="tg:77")
        core.gateway._executor.shutdown(wait=True)
        return reply

    assert not asyncio.run(scenario()).error
    (line,) = [r for r in json_logs() if r["message"] == "listing"]
    assert line["scope"] == "tg:77" and line["command"] == "concepts"
    assert "task_id" not in line


def test_worker_tasks_log_their_task_id_and_scope_and_are_counted(json_logs, tmp_path) -> None:
    import workers.tasks  # noqa: F401  (registers the tasks)
    from rapbot.settings import WorkerSettings
    from workers import runtime
    from workers.blobs import FolderBlobStore
    from workers.tasks import forget, list_concepts

    ok = {"task": "list_concepts", "outcome": "ok"}
    user_error = {"task": "forget", "outcome": "user_error"}
    before_ok, before_error = (
        value("rapbot_tasks_total", **ok),
        value("rapbot_tasks_total", **user_error),
    )
    before_seconds = value("rapbot_task_seconds_count", task="list_concepts")
    runtime.reset()
    runtime.use(
        engine=LoggingEngine(),
        blobs=FolderBlobStore(tmp_path / "blobs", 60),
        s=WorkerSettings(blob_url=f"dir:{tmp_path / 'blobs'}"),
    )
    try:
        listed = list_concepts.apply(kwargs={"scope": "tg:5"}, task_id="t-obs-1").get()
        denied = forget.apply(
            args=("tg:6", "Nobody", {"user": "bob", "is_admin": False}), task_id="t-obs-2"
        ).get()
    finally:
        runtime.reset()
    assert listed == {"concepts": []} and denied["error"]["type"] == "UnknownConceptError"
    (line,) = [r for r in json_logs() if r["message"] == "listing"]
    assert line["task_id"] == "t-obs-1" and line["scope"] == "tg:5"
    assert value("rapbot_tasks_total", **ok) == before_ok + 1
    assert value("rapbot_tasks_total", **user_error) == before_error + 1
    assert value("rapbot_task_seconds_count", task="list_concepts") == before_seconds + 1
