"""Distributed mode, fast: blob stores, the wire format, routing, the app's reliability
settings, tasks run in-process (``task.apply``), the client's error mapping, gateway selection.

The slow tests with a real Redis and real worker processes are in test_workers_failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time

import pytest

from engine.errors import (
    EngineUnavailableError,
    InvalidInputError,
    PermissionDeniedError,
    PhotoExpiredError,
    RapbotError,
    RepeatedCrashError,
    UnknownConceptError,
)
from engine.operations import OPERATIONS
from engine.permissions import Actor
from engine.types import Answer, Box, Concept, Recognition, RememberResult, UnknownObject
from rapbot.settings import WorkerSettings
from tests.workers_harness import RedisServer, redis_server_binary
from workers import runtime, wire
from workers.blobs import EXPIRED, FolderBlobStore, RedisBlobStore, open_blob_store

# ----------------------------------------------------------------------------- blob stores


def test_folder_blob_store_round_trip_ttl_and_missing_keys(tmp_path) -> None:
    store = FolderBlobStore(tmp_path, ttl_s=60)
    key = store.put(b"jpeg bytes")
    assert store.get(key) == b"jpeg bytes"
    assert len(key) >= 32 and "/" not in key
    assert key != store.put(b"jpeg bytes")  # random tokens, not content hashes

    old = time.time() - 61
    os.utime(tmp_path / "blobs" / key, (old, old))
    with pytest.raises(PhotoExpiredError) as expired:
        store.get(key)
    assert str(expired.value) == EXPIRED
    assert store.sweep() >= 1 and not (tmp_path / "blobs" / key).exists()

    for bad in ("missing-key-0123456789abcdef", "../../etc/passwd", "", "a" * 500):
        with pytest.raises(PhotoExpiredError):
            store.get(bad)
    store.delete("missing-key-0123456789abcdef")  # deleting twice is fine
    key = store.put(b"annotated")
    assert store.take(key) == b"annotated" and not (tmp_path / "blobs" / key).exists()
    assert not list((tmp_path / "blobs").glob(".*.tmp"))  # writes are renamed into place


def test_folder_blob_store_counters_are_atomic_across_threads(tmp_path) -> None:
    store = FolderBlobStore(tmp_path, ttl_s=60)
    threads = [threading.Thread(target=store.incr, args=("deliveries:t1", 60)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.incr("deliveries:t1", 60) == 21
    assert store.incr("deliveries:t2", 60) == 1


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def test_redis_blob_store_round_trip_ttl_and_missing_keys(private_redis) -> None:
    import redis

    store = open_blob_store(private_redis.url(2), 900)
    assert isinstance(store, RedisBlobStore)
    key = store.put(b"\xff\xd8photo")
    assert store.get(key) == b"\xff\xd8photo"
    assert 890 <= redis.Redis(port=private_redis.port, db=2).ttl(store.prefix + key) <= 900
    store.delete(key)
    with pytest.raises(PhotoExpiredError, match="expired before the engine got to it"):
        store.get(key)
    key = store.put(b"annotated")
    assert store.take(key) == b"annotated"  # read and removed in one round trip
    with pytest.raises(PhotoExpiredError):
        store.take(key)
    short = RedisBlobStore(private_redis.url(2), ttl_s=1)
    key = short.put(b"x")
    time.sleep(1.1)
    with pytest.raises(PhotoExpiredError):
        short.get(key)
    assert [store.incr("deliveries:abc", 60) for _ in range(3)] == [1, 2, 3]


def test_redis_blob_store_that_is_down_is_engine_unavailable() -> None:
    from tests.workers_harness import free_port

    store = RedisBlobStore(f"redis://127.0.0.1:{free_port()}/2", 60, connect_timeout_s=0.5)
    with pytest.raises(EngineUnavailableError, match="busy or offline"):
        store.put(b"x")


def _streamed_pieces(store) -> None:
    from workers.streams import PiecePublisher, PieceReader

    now = [0.0]
    first = PiecePublisher(store, "task-1", interval_s=1.0, clock=lambda: now[0])
    reader = PieceReader(store, "task-1")
    assert reader.read(0) == ""
    first.add("Mochi ")
    first.add("is ")  # batched: nothing published within the interval
    assert reader.read(0) == ""
    now[0] += 1.0
    first.add("asleep")
    assert reader.read(0.5) == "Mochi is asleep"
    # The worker died; the redelivered run generates the same answer from the start: only
    # the text not shown yet comes out.
    again = PiecePublisher(store, "task-1", interval_s=0.0)
    for piece in ("Mochi ", "is asleep", " on the sofa."):
        again.add(piece)
    again.flush()
    assert reader.read(0.5) == " on the sofa."
    assert PieceReader(store, "task-1").read(0) == "Mochi is asleep on the sofa."
    assert PieceReader(store, "task-2").read(0.05) == ""  # another task's log: nothing


def test_streamed_pieces_through_a_folder_store(tmp_path) -> None:
    _streamed_pieces(FolderBlobStore(tmp_path, ttl_s=60))


def test_streamed_pieces_through_redis(private_redis) -> None:
    _streamed_pieces(open_blob_store(private_redis.url(2), 60))


def test_blob_url_forms(tmp_path) -> None:
    assert isinstance(open_blob_store(f"dir:{tmp_path}", 60), FolderBlobStore)
    with pytest.raises(ValueError, match="RAPBOT_BLOB_URL"):
        open_blob_store("https://cdn.example.com/x", 60)


# ----------------------------------------------------------------------------- wire format


def all_error_classes() -> list[type[RapbotError]]:
    found, todo = [], [RapbotError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_rapbot_error_crosses_the_wire_as_itself(cls) -> None:
    sent = json.loads(json.dumps(wire.error_result(cls("Nope, and here is why."))))
    with pytest.raises(cls) as raised:
        wire.raise_for_error(sent)
    assert type(raised.value) is cls and str(raised.value) == "Nope, and here is why."


def test_unknown_error_types_become_rapbot_errors_and_results_pass_through() -> None:
    with pytest.raises(RapbotError, match="hello"):
        wire.raise_for_error({"error": {"type": "SomethingNew", "message": "hello"}})
    assert wire.raise_for_error({"concepts": []}) == {"concepts": []}


def test_engine_values_round_trip_through_json() -> None:
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        blobs[f"key-{len(blobs)}"] = data
        return f"key-{len(blobs) - 1}"

    def through(value, tp):
        return wire.from_json(json.loads(json.dumps(wire.to_json(value, tp, put))), tp, blobs.get)

    concept = Concept("c1", "tg:1", "Mochi", "my grey cat", "cat", "alice", 1.5, 2)
    remembered = RememberResult(concept, Box(1, 2, 30, 40), True)
    sent = wire.to_json(remembered, RememberResult, put)
    assert sent["box"] == [1, 2, 30, 40] and sent["concept"]["name"] == "Mochi"
    assert through(remembered, RememberResult) == remembered
    answer = Answer(
        "Mochi is on the left.",
        [Recognition("c1", "Mochi", "my grey cat", "cat", 0.99, Box(0, 0, 5, 5), "on the left")],
        [UnknownObject("person", Box(5, 5, 9, 9), "on the right")],
        b"\xff\xd8annotated",
        {"detect": 0.01},
    )
    sent = wire.to_json(answer, Answer, put)
    assert blobs[sent["image"]] == answer.image  # photos travel by reference
    assert set(sent) == {"text", "concepts", "unknown", "image", "timings"}
    assert through(answer, Answer) == answer
    assert through(Actor("bob", True), Actor) == Actor("bob", True)
    assert wire.from_json({"user": "bob"}, Actor, blobs.get) == Actor("bob", False)
    with pytest.raises(InvalidInputError):
        wire.from_json([1, 2, 3], Box, blobs.get)


def test_operation_arguments_and_results_keep_their_wire_names() -> None:
    from engine.operations import OPERATIONS

    search, listing = OPERATIONS["search"], OPERATIONS["list_concepts"]
    keys: list[bytes] = []
    sent = wire.arguments_to_json(
        search, search.bind(("tg:1",), {"ref_image": b"jpeg"}), lambda d: keys.append(d) or "k1"
    )
    assert sent == {"scope": "tg:1", "text": "", "photo": "k1", "k": 10} and keys == [b"jpeg"]
    back = wire.arguments_from_json(search, {"scope": "tg:1", "photo": "k1"}, {"k1": b"j"}.get)
    assert back == {"scope": "tg:1", "text": "", "ref_image": b"j", "k": 10}
    with pytest.raises(TypeError, match="unexpected"):
        wire.arguments_from_json(search, {"scope": "tg:1", "image": "k1"}, {}.get)
    assert wire.result_to_json(listing, [], {}.get) == {"concepts": []}


# ----------------------------------------------------------------------------- app settings


def test_routing_sends_model_work_to_gpu_and_store_work_to_cpu() -> None:
    from workers.app import MODEL_TASKS, STORE_TASKS, create_app, task_name

    app = create_app(WorkerSettings(gpu_queue="gpu-x", cpu_queue="cpu-x"))
    router = app.amqp.router
    for op in MODEL_TASKS:
        assert router.route({}, task_name(op))["queue"].name == "gpu-x"
    for op in STORE_TASKS:
        assert router.route({}, task_name(op))["queue"].name == "cpu-x"
    assert router.route({}, "rapbot.ping")["queue"].name == "cpu-x"
    # Each queue has its own binding: a message lands in exactly one queue.
    bindings = {(q.name, q.exchange.name, q.routing_key) for q in app.conf.task_queues}
    assert bindings == {("gpu-x", "gpu-x", "gpu-x"), ("cpu-x", "cpu-x", "cpu-x")}


def test_app_reliability_settings() -> None:
    from workers.app import create_app

    settings = WorkerSettings()
    conf = create_app(settings).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"] and list(conf.result_accept_content) == ["json"]
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.broker_connection_retry_on_startup is True
    assert conf.result_expires == settings.result_expires_s
    options = conf.broker_transport_options
    assert options["visibility_timeout"] > conf.task_time_limit
    assert options["unacked_restore_throttle"] == 1
    policy = conf.task_publish_retry_policy
    assert policy["max_retries"] >= 1 and policy["interval_max"] <= 1.0


def test_settings_refuse_a_visibility_timeout_below_the_hard_limit() -> None:
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        WorkerSettings(task_time_limit_s=60, visibility_timeout_s=30)
    with pytest.raises(ValueError, match="SOFT_TIME_LIMIT"):
        WorkerSettings(task_soft_time_limit_s=30, task_time_limit_s=20)


def test_rabbitmq_urls_configure_without_redis_transport_options() -> None:
    from workers.app import create_app

    app = create_app(WorkerSettings(broker_url="amqp://guest:guest@rabbit:5672//"))
    assert app.conf.broker_url.startswith("amqp://")
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.connection_for_write().transport.driver_type == "amqp"


# ----------------------------------------------------------------------------- tasks, in-process


@pytest.fixture
def worker_state(tiny_engine, tmp_path):
    """The task module's process state, with the tiny engine and a folder blob store."""
    import workers.tasks  # noqa: F401  (registers the tasks)

    settings = WorkerSettings(blob_url=f"dir:{tmp_path / 'blobs'}", max_redeliveries=2)
    blobs = FolderBlobStore(tmp_path / "blobs", 60)
    runtime.reset()
    runtime.use(engine=tiny_engine, blobs=blobs, s=settings)
    yield blobs
    runtime.reset()


def cat_photo(dreambooth) -> bytes:
    return (dreambooth / "cat" / "00.jpg").read_bytes()


def test_remember_task_is_idempotent_by_platform_message_id(worker_state, dreambooth) -> None:
    from workers.tasks import list_concepts, remember

    key = worker_state.put(cat_photo(dreambooth))
    kwargs = {"scope": "tg:1", "photo": key, "name": "Mochi", "user": "alice", "source": "m-42"}
    first = remember.apply(kwargs=kwargs).get()
    again = remember.apply(kwargs=kwargs).get()  # a redelivery: another run, same message
    assert first["created"] is True and again["concept"]["id"] == first["concept"]["id"]
    listed = list_concepts.apply(kwargs={"scope": "tg:1"}).get()["concepts"]
    assert [(c["name"], c["examples"]) for c in listed] == [("Mochi", 1)]


def test_tasks_return_user_errors_as_results(worker_state, dreambooth) -> None:
    from workers.tasks import recognize, remember, rename

    result = rename.apply(
        kwargs={"scope": "tg:1", "name": "Nobody", "new_name": "X", "actor": {"user": "a"}}
    )
    assert result.successful()  # not a task failure: no retry, no traceback
    with pytest.raises(UnknownConceptError):
        wire.raise_for_error(result.get())

    key = worker_state.put(cat_photo(dreambooth))
    remember.apply(kwargs={"scope": "tg:1", "photo": key, "name": "Mochi", "user": "alice"})
    denied = rename.apply(
        kwargs={"scope": "tg:1", "name": "Mochi", "new_name": "Bo", "actor": {"user": "eve"}}
    ).get()
    with pytest.raises(PermissionDeniedError):
        wire.raise_for_error(denied)
    gone = recognize.apply(kwargs={"scope": "tg:1", "photo": "expired-key-0123456789abcdef"})
    with pytest.raises(PhotoExpiredError, match="send it again"):
        wire.raise_for_error(gone.get())


def test_recognize_task_returns_the_annotated_photo_by_reference(worker_state, dreambooth) -> None:
    from workers.tasks import recognize, remember

    key = worker_state.put(cat_photo(dreambooth))
    remember.apply(kwargs={"scope": "tg:1", "photo": key, "name": "Mochi", "user": "alice"})
    result = recognize.apply(kwargs={"scope": "tg:1", "photo": key, "user": "bob"}).get()
    assert [c["name"] for c in result["concepts"]] == ["Mochi"]
    assert worker_state.get(result["image"])[:2] == b"\xff\xd8"
    json.dumps(result)  # plain JSON all the way


def test_photo_search_tasks_index_and_find_per_scope(worker_state, dreambooth) -> None:
    from workers.tasks import index_photo, indexing, search, set_indexing

    admin = {"user": "alice", "is_admin": True}
    assert indexing.apply(kwargs={"scope": "tg:1"}).get() == {"enabled": False}
    key = worker_state.put(cat_photo(dreambooth))
    off = index_photo.apply(kwargs={"scope": "tg:1", "photo": key, "user": "bob", "source": "f1"})
    assert off.get() == {"photo_id": None}  # indexing is off until an admin turns it on
    denied = set_indexing.apply(kwargs={"scope": "tg:1", "enabled": True, "actor": {"user": "bob"}})
    with pytest.raises(PermissionDeniedError):
        wire.raise_for_error(denied.get())
    assert set_indexing.apply(kwargs={"scope": "tg:1", "enabled": True, "actor": admin}).get() == {
        "removed": 0
    }
    assert indexing.apply(kwargs={"scope": "tg:1"}).get() == {"enabled": True}
    assert indexing.apply(kwargs={"scope": "tg:2"}).get() == {"enabled": False}
    kwargs = {"scope": "tg:1", "photo": key, "user": "bob", "source": "f1"}
    first = index_photo.apply(kwargs=kwargs).get()["photo_id"]
    assert index_photo.apply(kwargs=kwargs).get()["photo_id"] == first  # redelivery: same photo
    found = search.apply(kwargs={"scope": "tg:1", "text": "", "photo": key, "k": 3}).get()
    hits = wire.result_from_json(OPERATIONS["search"], json.loads(json.dumps(found)), None)
    assert [h.source for h in hits] == ["f1"] and hits[0].score > 0.99
    other = search.apply(kwargs={"scope": "tg:2", "text": "", "photo": key, "k": 3}).get()
    assert other == {"results": []}


class QuickEngine:
    """Answers at once: for tests of the task plumbing, not of the engine."""

    def recognize(self, scope, image, user=None):
        return Answer(f"{len(image)} bytes", [], [], None, {})

    def list_concepts(self, scope):
        return []


def test_deliveries_beyond_the_cap_end_in_a_clear_error(worker_state) -> None:
    from workers.tasks import list_concepts, recognize

    runtime.use(engine=QuickEngine())
    key = worker_state.put(b"\xff\xd8poison")
    runs = [
        recognize.apply(kwargs={"scope": "tg:1", "photo": key}, task_id="poison-1").get()
        for _ in range(4)
    ]
    assert [r.get("text") for r in runs[:3]] == ["8 bytes"] * 3  # first + 2 redeliveries
    with pytest.raises(RepeatedCrashError) as gave_up:
        wire.raise_for_error(runs[3])
    assert str(gave_up.value) == "This photo made the engine crash 3 times; giving up."
    for _ in range(3):
        list_concepts.apply(kwargs={"scope": "tg:1"}, task_id="t-list")
    last = list_concepts.apply(kwargs={"scope": "tg:1"}, task_id="t-list").get()
    assert last["error"]["message"].startswith("This request made the engine crash")
    assert list_concepts.apply(kwargs={"scope": "tg:1"}).get() == {"concepts": []}  # new id


def test_redelivered_rename_and_forget_answer_as_the_first_run_did(
    worker_state, dreambooth
) -> None:
    from workers.tasks import forget, remember, rename

    key = worker_state.put(cat_photo(dreambooth))
    remember.apply(kwargs={"scope": "tg:1", "photo": key, "name": "Mochi", "user": "alice"})
    args = {"scope": "tg:1", "name": "Mochi", "new_name": "Bo", "actor": {"user": "alice"}}
    assert rename.apply(kwargs=args, task_id="r1").get()["concept"]["name"] == "Bo"
    assert rename.apply(kwargs=args, task_id="r1").get()["concept"]["name"] == "Bo"
    args = {"scope": "tg:1", "name": "Bo", "actor": {"user": "alice"}}
    assert forget.apply(kwargs=args, task_id="f1").get()["concept"]["name"] == "Bo"
    assert forget.apply(kwargs=args, task_id="f1").get()["concept"]["name"] == "Bo"
    assert "error" in forget.apply(kwargs=args, task_id="f2").get()  # a new request: unknown


def test_soft_time_limit_in_a_task_is_a_clear_error(worker_state) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from workers.tasks import list_concepts

    class Stuck:
        def list_concepts(self, scope):
            raise SoftTimeLimitExceeded()

    runtime.use(engine=Stuck())
    result = list_concepts.apply(kwargs={"scope": "tg:1"}).get()
    with pytest.raises(EngineUnavailableError, match="took too long"):
        wire.raise_for_error(result)


def test_watchdog_interrupts_at_the_soft_limit_and_escalates_at_the_hard_limit() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    hard: list[str] = []
    dog = runtime.Watchdog(0.2, 0.6, interval_s=0.05, on_hard=lambda t, n, s: hard.append(t))
    dog.start()
    outcome: list[str] = []

    def busy(task_id: str, seconds: float) -> None:
        try:
            with dog.track(task_id, "rapbot.test"):
                end = time.monotonic() + seconds
                while time.monotonic() < end:  # Python steps: the exception gets in
                    pass
            outcome.append("finished")
        except SoftTimeLimitExceeded:
            outcome.append("soft")

    threads = [threading.Thread(target=busy, args=("slow", 2.0))]
    threads += [threading.Thread(target=busy, args=("quick", 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(outcome) == ["finished", "soft"]
    assert hard == []  # the soft limit ended the slow one in time

    def stuck() -> None:  # ignores the soft limit, like a long C call
        with dog.track("stuck", "rapbot.test"):
            for _ in range(40):
                with contextlib.suppress(SoftTimeLimitExceeded):
                    time.sleep(0.05)

    t = threading.Thread(target=stuck)
    t.start()
    t.join(5)
    dog.stop()
    assert "stuck" in hard


def test_a_channel_whose_broker_connection_is_gone_raises_a_connection_error() -> None:
    # The kombu/celery 5.7 crash on a lost connection (see runtime.patch_lost_connection_errors)
    # becomes a connection error, which kombu and Celery handle as an outage.
    import redis
    from kombu.transport import redis as kombu_redis

    runtime.patch_lost_connection_errors()
    runtime.patch_lost_connection_errors()  # idempotent
    channel = kombu_redis.Channel.__new__(kombu_redis.Channel)
    channel.connection = None
    with pytest.raises(redis.ConnectionError):
        channel._create_client()


# ----------------------------------------------------------------------------- store-only engine


def test_store_only_engine_manages_concepts_without_loading_models(tiny_models, tmp_path) -> None:
    from engine.engine import Engine

    settings, models = tiny_models
    settings = settings.model_copy(update={"data_dir": tmp_path})
    store_only = Engine.open(settings, load_models=False)
    try:
        assert (store_only.store.model_id, store_only.store.dim) == (
            models.embedder.model_id,
            models.embedder.dim,
        )
        assert store_only.list_concepts("tg:1") == []
        assert store_only.forget_user("nobody") == 0
        with pytest.raises(UnknownConceptError):
            store_only.rename("tg:1", "Mochi", "Bo", Actor("alice"))
        assert store_only.loaded_parts().models is None  # nothing above needed a model
    finally:
        store_only.close()


# ----------------------------------------------------------------------------- client, gateway


def test_client_turns_a_broker_that_is_down_into_engine_unavailable(tmp_path) -> None:
    from tests.workers_harness import free_port
    from workers.client import CeleryGateway

    port = free_port()  # nothing listens here
    settings = WorkerSettings(
        broker_url=f"redis://127.0.0.1:{port}/0",
        result_backend=f"redis://127.0.0.1:{port}/1",
        blob_url=f"dir:{tmp_path}",
        publish_retry_s=0.5,
    )

    async def scenario() -> list[float]:
        g = CeleryGateway(settings, timeout_s=20)
        seconds = []
        try:
            for call in (
                lambda: g.list_concepts("tg:1"),
                lambda: g.recognize("tg:1", b"\xff\xd8 not even a photo", "alice"),
            ):
                started = time.monotonic()
                with pytest.raises(EngineUnavailableError, match="busy or offline"):
                    await call()
                seconds.append(time.monotonic() - started)
            return seconds
        finally:
            await g.close()

    # Refused connections fail after the bounded retries, well before the client timeout.
    assert max(asyncio.run(scenario())) < 6


def test_client_maps_task_failures() -> None:
    from celery.exceptions import TimeLimitExceeded

    from workers.client import CeleryGateway

    g = CeleryGateway.__new__(CeleryGateway)
    assert isinstance(g._failure("recognize", "REVOKED", None), EngineUnavailableError)
    assert isinstance(g._failure("recognize", "FAILURE", TimeLimitExceeded(30)), RapbotError)
    bug = g._failure("recognize", "FAILURE", ValueError("bug"))
    assert isinstance(bug, RuntimeError) and not isinstance(bug, RapbotError)


def test_gateway_is_chosen_by_configuration(monkeypatch) -> None:
    from bots.core import gateway as gateways
    from workers.client import CeleryGateway

    made = gateways.make_gateway("celery")
    assert isinstance(made, CeleryGateway)
    asyncio.run(made.close())

    monkeypatch.setenv("RAPBOT_GATEWAY", "celery")
    made = gateways.make_gateway()
    assert isinstance(made, CeleryGateway)
    asyncio.run(made.close())

    import engine.engine

    stand_in = type("StandInEngine", (), {})()  # wrapped by the local gateway, never called
    monkeypatch.setattr(engine.engine.Engine, "open", classmethod(lambda cls, s=None: stand_in))
    monkeypatch.setenv("RAPBOT_GATEWAY", "local")
    local = gateways.make_gateway()
    assert isinstance(local, gateways.LocalGateway) and local.engine is stand_in
    with pytest.raises(InvalidInputError, match="RAPBOT_GATEWAY"):
        gateways.make_gateway("grpc")


def test_celery_gateway_has_the_local_gateways_operations() -> None:
    import inspect

    from bots.core.gateway import LocalGateway
    from workers.client import CeleryGateway

    for name, fn in inspect.getmembers(LocalGateway, inspect.iscoroutinefunction):
        if name.startswith("_"):
            continue
        ours = getattr(CeleryGateway, name)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(fn).parameters), (
            name
        )


def test_bots_using_the_celery_gateway_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from bots.core.gateway import make_gateway; g = make_gateway('celery'); "
        "import bots.core.serve; print('torch' in sys.modules, 'engine.engine' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


# ----------------------------------------------------------------------------- rapbot worker


def test_worker_defaults_for_gpu_and_cpu_machines() -> None:
    from workers.main import GPU_THREADS, plan_worker, resolve_queues

    s = WorkerSettings()
    both = resolve_queues("gpu,cpu", s)
    one_gpu = plan_worker(both, s, gpus=1)
    assert (one_gpu.pool, one_gpu.concurrency, one_gpu.device) == ("threads", GPU_THREADS, "cuda:0")
    assert one_gpu.micro_batching is True
    assert plan_worker(both, s, gpus=4).gpus_to_spawn == 4  # one process per GPU
    assert plan_worker(both, s, device="cuda:2").device == "cuda:2"
    cpu = plan_worker(both, s, gpus=0)
    assert (cpu.pool, cpu.concurrency, cpu.device) == ("threads", os.cpu_count(), None)
    store_only = plan_worker(resolve_queues("cpu", s), s, gpus=2)
    assert store_only.gpus_to_spawn == 0 and store_only.micro_batching is None
    argv = one_gpu.celery_argv("info")
    assert "--pool=threads" in argv and "--queues=gpu,cpu" in argv
    with pytest.raises(ValueError):
        resolve_queues("gpu,video", s)


def test_worker_subcommand_is_wired_into_the_cli(monkeypatch) -> None:
    import rapbot.cli
    import workers.main

    seen: dict = {}
    monkeypatch.setattr(workers.main, "run_worker", lambda **kw: seen.update(kw) or 0)
    monkeypatch.setenv("RAPBOT_PROFILE", "cpu")  # restored (removed) after the test
    assert rapbot.cli.main(["worker", "--queues", "cpu", "--profile", "tiny"]) == 0
    assert seen["queues"] == "cpu" and os.environ["RAPBOT_PROFILE"] == "tiny"


def test_concept_sheet_and_crops_tasks(worker_state, dreambooth) -> None:
    from workers.tasks import concept_sheet, example_crops

    runtime.engine().remember("tg:1", cat_photo(dreambooth), "Mochi", user="tg:5")
    value = concept_sheet.apply(kwargs={"scope": "tg:1", "page": 1}).get()
    sheet = wire.result_from_json(OPERATIONS["concept_sheet"], value, worker_state.take)
    assert [c.name for c in sheet.concepts] == ["Mochi"] and sheet.image[:2] == b"\xff\xd8"
    crops = wire.result_from_json(
        OPERATIONS["example_crops"],
        example_crops.apply(kwargs={"scope": "tg:1", "name": "mochi"}).get(),
        worker_state.take,
    )
    assert len(crops) == 1 and crops[0][:2] == b"\xff\xd8"
    missing = concept_sheet.apply(kwargs={"scope": "tg:1", "page": 2}).get()
    with pytest.raises(InvalidInputError, match="only 1 page"):
        wire.raise_for_error(missing)
