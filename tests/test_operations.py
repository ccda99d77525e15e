"""The engine's operations are declared once (engine.operations) and everything else follows:
the Engine implements each, both gateways offer each, a Celery task runs each, and the wire
carries each one's arguments and result."""

from __future__ import annotations

import asyncio
import inspect
import typing
from typing import Any

import pytest

from engine.engine import Engine
from engine.operations import IN_PROCESS_ONLY, OPERATIONS, EngineGateway, Operation
from engine.permissions import Actor
from engine.types import (
    Answer,
    Box,
    Concept,
    ConceptSheet,
    PhotoHit,
    Recognition,
    RememberResult,
    UnknownObject,
)

CONCEPT = Concept("c1", "tg:1", "Mochi", "my grey cat", "cat", "alice", 1.5, 2)
SAMPLES: dict[Any, Any] = {
    str: "tg:1",
    bytes: b"\xff\xd8jpeg",
    bool: True,
    int: 3,
    Box | None: Box(1, 2, 3, 4),
    bytes | None: b"\xff\xd8ref",
    str | None: "alice",
    int | None: 2,
    Actor: Actor("alice", True),
}
RESULTS: dict[Any, Any] = {
    RememberResult: RememberResult(CONCEPT, Box(0, 0, 9, 9), True),
    Answer: Answer(
        "Mochi is here.",
        [Recognition("c1", "Mochi", "my grey cat", "cat", 0.99, Box(0, 0, 5, 5), "left")],
        [UnknownObject("dog", Box(5, 5, 9, 9), "right")],
        b"\xff\xd8annotated",
        {"detect": 0.5},
    ),
    list[Concept]: [CONCEPT],
    Concept: CONCEPT,
    int: 7,
    bool: True,
    int | None: 12,
    list[PhotoHit]: [PhotoHit(4, 0.9, "tg-file-1")],
    ConceptSheet: ConceptSheet([CONCEPT], 1, 1, 1, b"\xff\xd8sheet"),
    list[bytes]: [b"\xff\xd8crop-1", b"\xff\xd8crop-2"],
}


def sample_arguments(declared: Operation) -> dict[str, Any]:
    return {p.name: SAMPLES[p.annotation] for p in declared.parameters}


def public_members(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_every_engine_method_is_an_operation_or_in_process_only() -> None:
    assert public_members(Engine) - {f"{n}_stream" for n in OPERATIONS} - IN_PROCESS_ONLY == set(
        OPERATIONS
    )
    assert not set(OPERATIONS) & IN_PROCESS_ONLY


@pytest.mark.parametrize("declared", OPERATIONS.values(), ids=lambda op: op.name)
def test_the_engine_implements_each_operation_as_declared(declared: Operation) -> None:
    """The declared parameters come first, in order, with the same types and defaults; the
    engine's extra parameters (CLI only) have defaults; streaming ones have ``_stream``."""
    methods = [declared.name] + ([declared.stream_name] if declared.streams else [])
    for method in methods:
        fn = getattr(Engine, method)
        hints = typing.get_type_hints(fn)
        engine_parameters = list(inspect.signature(fn).parameters.values())[1:]
        for ours, theirs in zip(declared.parameters, engine_parameters, strict=False):
            assert ours.name == theirs.name, method
            assert hints.get(theirs.name, ours.annotation) == ours.annotation, (method, ours.name)
            if ours.default is not inspect.Parameter.empty:
                assert theirs.default == ours.default, (method, ours.name)
        extra = engine_parameters[len(declared.parameters) :]
        assert all(p.default is not inspect.Parameter.empty for p in extra), method
    assert typing.get_type_hints(getattr(Engine, declared.name))["return"] == declared.result
    assert SAMPLES.keys() >= {p.annotation for p in declared.parameters}
    assert declared.result in RESULTS


class RecordingEngine:
    """Answers every operation with a sample of its declared result; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        declared = OPERATIONS.get(name.removesuffix("_stream"))
        if declared is None:
            raise AttributeError(name)

        def call(*args):
            self.calls.append((name, args))
            if name.endswith("_stream"):
                return (item for item in ["Mochi ", "is here.", RESULTS[declared.result]])
            return RESULTS[declared.result]

        return call

    def close(self) -> None:
        pass


async def _through(gateway: EngineGateway, declared: Operation) -> tuple[Any, list | None]:
    arguments = sample_arguments(declared)
    result = await getattr(gateway, declared.name)(**arguments)
    streamed = None
    if declared.streams:
        streamed = [item async for item in getattr(gateway, declared.stream_name)(**arguments)]
    return result, streamed


def test_every_operation_reaches_the_engine_through_the_local_gateway() -> None:
    from bots.core.gateway import LocalGateway

    engine = RecordingEngine()

    async def scenario() -> None:
        gateway = LocalGateway(engine)
        try:
            for declared in OPERATIONS.values():
                result, streamed = await _through(gateway, declared)
                assert result == RESULTS[declared.result]
                if streamed is not None:
                    assert streamed == ["Mochi ", "is here.", RESULTS[declared.result]]
        finally:
            await gateway.close()

    asyncio.run(scenario())
    expected = []
    for declared in OPERATIONS.values():
        args = tuple(sample_arguments(declared).values())
        expected.append((declared.name, args))
        if declared.streams:
            expected.append((declared.stream_name, args))
    assert engine.calls == expected


class TaskGateway:
    """The Celery gateway's wire path, with the task run in-process (``Task.apply``) instead
    of on a worker: the JSON a bot sends, the task the worker runs, the JSON it returns."""

    def __init__(self, blobs) -> None:
        self.blobs = blobs

    def run(self, name: str, declared: Operation, arguments: dict[str, Any]) -> Any:
        import json

        from workers import wire
        from workers.app import task_name
        from workers.tasks import app

        kwargs = json.loads(json.dumps(wire.arguments_to_json(declared, arguments, self.blobs.put)))
        value = json.loads(json.dumps(app.tasks[task_name(name)].apply(kwargs=kwargs).get()))
        return wire.result_from_json(declared, wire.raise_for_error(value), self.blobs.take)


def test_every_operation_has_a_task_routed_to_its_queue_and_crosses_the_wire(tmp_path) -> None:
    from rapbot.settings import WorkerSettings
    from workers import runtime
    from workers.app import create_app, task_name
    from workers.blobs import FolderBlobStore

    settings = WorkerSettings(gpu_queue="gpu-q", cpu_queue="cpu-q")
    router = create_app(settings).amqp.router
    queues = {"gpu": "gpu-q", "cpu": "cpu-q"}
    blobs = FolderBlobStore(tmp_path / "blobs", 60)
    engine = RecordingEngine()
    runtime.reset()
    runtime.use(engine=engine, blobs=blobs, s=WorkerSettings(blob_url=f"dir:{tmp_path}"))
    try:
        tasks = TaskGateway(blobs)
        for declared in OPERATIONS.values():
            names = [declared.name] + ([declared.stream_name] if declared.streams else [])
            for name in names:
                queue = router.route({}, task_name(name))["queue"].name
                assert queue == queues[declared.queue], name
                result = tasks.run(name, declared, sample_arguments(declared))
                assert result == RESULTS[declared.result], name
                assert engine.calls[-1] == (name, tuple(sample_arguments(declared).values()))
    finally:
        runtime.reset()


def test_both_gateways_offer_the_declared_operations_with_the_declared_signatures() -> None:
    from bots.core.gateway import LocalGateway
    from workers.client import CeleryGateway

    for gateway in (LocalGateway, CeleryGateway):
        for declared in OPERATIONS.values():
            method = getattr(gateway, declared.name)
            assert inspect.iscoroutinefunction(method)
            parameters = list(inspect.signature(method).parameters)
            assert parameters == ["self", *declared.signature.parameters]
            if declared.streams:
                assert inspect.isasyncgenfunction(getattr(gateway, declared.stream_name))


def test_gateway_observers_see_every_result_once() -> None:
    from bots.core.gateway import LocalGateway
    from rapbot import metrics

    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        gateway = LocalGateway(RecordingEngine())
        gateway.add_observer(lambda op, result: seen.append((op.name, result)))
        assert metrics.observed_gateway(gateway) is gateway  # an observer, not a wrapper
        metrics.observed_gateway(gateway)  # once, however often
        try:
            await gateway.recognize("tg:1", b"jpeg")
            async for _ in gateway.ask_stream("tg:1", None, "Who is Mochi?"):
                pass
        finally:
            await gateway.close()

    def detect_seconds() -> float:
        return (
            metrics.REGISTRY.get_sample_value("rapbot_stage_seconds_sum", {"stage": "detect"})
            or 0.0
        )

    before = detect_seconds()
    asyncio.run(scenario())
    assert seen == [("recognize", RESULTS[Answer]), ("ask", RESULTS[Answer])]
    assert detect_seconds() == pytest.approx(before + 2 * 0.5)  # each answer's timings, once
