"""The engine's operations, each declared once, and the gateway base derived from them.

An operation is declared below as a stub: its name, parameters, their types and defaults, and
its result type are the stub's signature; :func:`operation` adds the Celery queue it runs on
(``gpu``: needs the models; ``cpu``: the store only), whether it also streams (``<name>_stream``
yields the answer's text pieces, then the result), and the JSON key its result travels under
when it is not a dataclass. Everything else is derived from :data:`OPERATIONS`:

* :class:`EngineGateway`: one coroutine per operation (and an async generator per streaming
  one), with the stub's signature, so ``gateway.recognize(scope, image, user)`` reads as the
  engine's call does. A gateway only says how to run one (``_call``) and how to stream one
  (``_stream``): in-process (``bots.core.gateway.LocalGateway``) or on Celery workers
  (``workers.client.CeleryGateway``).
* the Celery tasks, their names and queues (``workers.tasks``, ``workers.app``), and the JSON
  of their arguments and results, by type (``workers.wire``).

``engine.engine.Engine`` implements each operation as a method of the same name that takes the
declared parameters first, in the declared order (it may take more, with defaults, for the CLI);
``tests/test_operations.py`` holds the two in step. This module imports no model library, and
not ``engine.engine``: a bot in distributed mode loads it without torch.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from engine.permissions import Actor
from engine.types import Answer, Box, Concept, ConceptSheet, PhotoHit, RememberResult

Queue = Literal["gpu", "cpu"]
GPU: Queue = "gpu"  # model work (detector, CLIP, the LLM)
CPU: Queue = "cpu"  # store-only work: no model is loaded for it

# Engine methods that are not operations: they stay in-process (the CLI, the doctor, workers'
# own start-up) and never cross a gateway. Listed so that a new public Engine method is either
# declared below or added here on purpose (tests/test_operations.py checks both ways).
IN_PROCESS_ONLY = frozenset(
    {
        "open",
        "open_store",
        "close",
        "loaded_parts",
        "concept",
        "vocabulary",
        "categories",
        "embed_thumbnails",
        "reindex_photos",
        "reindex_report",
        "models",
        "retriever",
        "photos",
        "search_encoder",
        "generator",
        "compose_query",
        "retrieval_policy",
    }
)


@dataclass(frozen=True)
class Operation:
    """One engine operation as declared (see the module notes)."""

    name: str
    signature: inspect.Signature  # the parameters, their types resolved; no ``self``
    result: Any  # the result's type, resolved (``Answer``, ``list[Concept]``, ``int | None``...)
    queue: Queue
    streams: bool = False  # also ``<name>_stream``: text pieces, then the result
    result_key: str | None = None  # the JSON key of a result that is not a dataclass
    doc: str = ""

    @property
    def stream_name(self) -> str:
        return f"{self.name}_stream"

    @property
    def parameters(self) -> list[inspect.Parameter]:
        return list(self.signature.parameters.values())

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, in the declared order, defaults filled in; a call
        that does not fit the signature raises TypeError, as a plain function call would."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)


OPERATIONS: dict[str, Operation] = {}


def operation(
    queue: Queue, *, streams: bool = False, result_key: str | None = None
) -> Callable[[Callable[..., Any]], Operation]:
    """Declare the stub below it as an operation (and register it in :data:`OPERATIONS`)."""

    def declare(stub: Callable[..., Any]) -> Operation:
        hints = typing.get_type_hints(stub)
        signature = inspect.signature(stub)
        parameters = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()]
        declared = Operation(
            name=stub.__name__,
            signature=signature.replace(parameters=parameters, return_annotation=hints["return"]),
            result=hints["return"],
            queue=queue,
            streams=streams,
            result_key=result_key,
            doc=inspect.getdoc(stub) or "",
        )
        if declared.name in OPERATIONS:
            raise ValueError(f"operation {declared.name} is declared twice")
        OPERATIONS[declared.name] = declared
        return declared

    return declare


# ----------------------------------------------------------------------------- the operations
# Stubs: only their signatures and docstrings are used. Photos are ``bytes``.


@operation(GPU)
def remember(
    scope: str,
    image: bytes,
    name: str,
    description: str = "",
    user: str = "local",
    box: Box | None = None,
    source: str | None = None,
) -> RememberResult:
    """Store a new concept, or add an example photo when the name exists in the scope;
    idempotent by ``source`` (the platform's message id)."""


@operation(GPU)
def recognize(scope: str, image: bytes, user: str | None = None) -> Answer:
    """Who and what of this scope is in the photo, in words and drawn boxes."""


@operation(GPU, streams=True)
def ask(scope: str, image: bytes | None, question: str, user: str | None = None) -> Answer:
    """Answer a question about a photo or about remembered concepts."""


@operation(GPU, streams=True)
def caption(scope: str, image: bytes, user: str | None = None) -> Answer:
    """A personalized caption: the photo described with the names of its concepts."""


@operation(CPU, result_key="concepts")
def list_concepts(scope: str) -> list[Concept]:
    """The scope's concepts."""


@operation(CPU)
def concept_sheet(scope: str, page: int = 1) -> ConceptSheet:
    """One page of the scope's concepts with their contact sheet (a JPEG)."""


@operation(CPU, result_key="crops")
def example_crops(scope: str, name: str, limit: int | None = None) -> list[bytes]:
    """The JPEG crops of a concept's example photos, first example first (at most ``limit``)."""


@operation(CPU, result_key="concept")
def rename(scope: str, name: str, new_name: str, actor: Actor) -> Concept:
    """Rename a concept (its owner or a chat admin)."""


@operation(CPU, result_key="concept")
def describe(scope: str, name: str, description: str, actor: Actor) -> Concept:
    """Change a concept's description (its owner or a chat admin)."""


@operation(CPU, result_key="concept")
def forget(scope: str, name: str, actor: Actor) -> Concept:
    """Forget a concept and its example photos (its owner or a chat admin)."""


@operation(CPU, result_key="removed")
def forget_user(user: str) -> int:
    """Remove everything a user remembered and every photo they posted, in every scope."""


@operation(CPU, result_key="removed")
def set_indexing(scope: str, enabled: bool, actor: Actor, delete: bool = False) -> int:
    """Turn the scope's photo indexing on or off (chat admins); returns photos forgotten."""


@operation(CPU, result_key="enabled")
def indexing(scope: str) -> bool:
    """Whether the scope's posted photos are indexed for /search (cheap: no model); bots
    ask before downloading a posted photo (``bots.core.photo_indexing.PhotoIndexing``)."""


@operation(GPU, result_key="photo_id")
def index_photo(scope: str, image: bytes, user: str, source: str) -> int | None:
    """Add a posted photo to the scope's search history; None when indexing is off."""


@operation(GPU, result_key="results")
def search(
    scope: str, text: str = "", ref_image: bytes | None = None, k: int = 10
) -> list[PhotoHit]:
    """Composed image search over the scope's photos, best first."""


# ----------------------------------------------------------------------------- gateways

Observer = Callable[[Operation, Any], None]


class EngineGateway:
    """The engine's operations as coroutines, generated from :data:`OPERATIONS`.

    A subclass implements :meth:`_call` (run one operation, return its result) and
    :meth:`_stream` (run a streaming one, yielding text pieces and then the result).
    :meth:`add_observer` is the hook for observability: an observer sees every result that
    reaches the caller (a stream's final result), with the operation that produced it.
    """

    _observers: tuple[Observer, ...] = ()

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(operation, result)`` after every operation (once per observer)."""
        if observer not in self._observers:
            self._observers = (*self._observers, observer)

    def _observed(self, declared: Operation, result: Any) -> None:
        for observer in self._observers:
            observer(declared, result)

    async def _call(self, declared: Operation, arguments: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _stream(self, declared: Operation, arguments: dict[str, Any]) -> AsyncIterator[Any]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the gateway holds (threads, connections)."""


def _coroutine(declared: Operation) -> Callable[..., Any]:
    async def call(self: EngineGateway, *args: Any, **kwargs: Any) -> Any:
        result = await self._call(declared, declared.bind(args, kwargs))
        self._observed(declared, result)
        return result

    return _named(call, declared.name, declared, declared.result)


def _streaming(declared: Operation) -> Callable[..., Any]:
    async def stream(self: EngineGateway, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        items = self._stream(declared, declared.bind(args, kwargs))
        try:
            async for item in items:
                if not isinstance(item, str):  # the result, after the text pieces
                    self._observed(declared, item)
                yield item
        finally:  # leaving early must stop the generation at once, not at garbage collection
            await items.aclose()

    pieces = AsyncIterator[str | declared.result]
    return _named(stream, declared.stream_name, declared, pieces)


def _named(fn: Callable[..., Any], name: str, declared: Operation, returns: Any) -> Any:
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fn.__name__ = name
    fn.__qualname__ = f"EngineGateway.{name}"
    fn.__doc__ = declared.doc
    fn.__signature__ = declared.signature.replace(  # type: ignore[attr-defined]
        parameters=[self_parameter, *declared.parameters], return_annotation=returns
    )
    return fn


for _declared in OPERATIONS.values():
    setattr(EngineGateway, _declared.name, _coroutine(_declared))
    if _declared.streams:
        setattr(EngineGateway, _declared.stream_name, _streaming(_declared))
