"""The JSON that crosses the broker, derived by type from the operations' declarations.

Only JSON goes over the wire (no pickle: a worker must never unpickle what a bot sent). Values
are encoded by their declared type (:mod:`engine.operations`): a dataclass as an object of its
fields, a :class:`~engine.types.Box` as ``[x1, y1, x2, y2]``, lists and optionals item by item,
plain JSON types as they are, and ``bytes`` (photos, annotated answers) *by reference*: the
sender puts them in the blob store and sends the key (:mod:`workers.blobs`). A photo argument
travels as ``photo``; a result that is not a dataclass goes under its operation's
``result_key`` (``{"concepts": [...]}``).

A :class:`~engine.errors.RapbotError` raised by the engine is *returned*, as
``{"error": {"type": "UnknownConceptError", "message": "..."}}``: it is a normal answer for the
user, not a task failure, so Celery neither retries it nor logs a traceback, and the client
raises the same class again with the same message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

from engine.errors import InvalidInputError, RapbotError
from engine.operations import Operation
from engine.types import Box

JSON = dict[str, Any]
PHOTO = "photo"  # the wire name of an operation's photo (its one ``bytes`` parameter)
PutBlob = Callable[[bytes], str]
GetBlob = Callable[[str], "bytes | None"]

# ----------------------------------------------------------------------------- errors


def error_result(error: RapbotError) -> JSON:
    return {"error": {"type": type(error).__name__, "message": str(error)}}


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def error_class(name: str) -> type[RapbotError]:
    """The RapbotError subclass called ``name`` (RapbotError itself if unknown here)."""
    import engine.errors  # noqa: F401  (every engine error class is defined)

    for cls in [RapbotError, *_subclasses(RapbotError)]:
        if cls.__name__ == name:
            return cls
    return RapbotError


def raise_for_error(result: Any) -> Any:
    """Raise the error a task returned; otherwise hand the result back unchanged."""
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        error = result["error"]
        raise error_class(str(error.get("type", "")))(str(error.get("message", "")))
    return result


# ----------------------------------------------------------------------------- values by type


def _optional(tp: Any) -> Any | None:
    """``X`` for ``X | None``; None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and len(typing.get_args(tp)) == 2:
            return arms[0]
    return None


@cache
def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def to_json(value: Any, tp: Any, put_blob: PutBlob) -> Any:
    """``value`` of type ``tp`` as JSON; ``bytes`` go into the blob store (``put_blob``)."""
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else to_json(value, inner, put_blob)
    if tp is bytes:
        return put_blob(bytes(value))
    if tp is Box:
        return value.as_list()
    if dataclasses.is_dataclass(tp):
        return {name: to_json(getattr(value, name), t, put_blob) for name, t in _fields(tp).items()}
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [to_json(v, item, put_blob) for v in value]
    if typing.get_origin(tp) is dict:
        return dict(value)
    return value  # str, int, float, bool: JSON already


def from_json(data: Any, tp: Any, get_blob: GetBlob) -> Any:
    """The value of type ``tp`` that :func:`to_json` made; blob keys are read by ``get_blob``."""
    inner = _optional(tp)
    if inner is not None:
        return None if data is None else from_json(data, inner, get_blob)
    if tp is bytes:
        return get_blob(data)
    if tp is Box:
        if not isinstance(data, (list, tuple)) or len(data) != 4:
            raise InvalidInputError("A box is four numbers: x1, y1, x2, y2.")
        return Box.from_xyxy(data)
    if dataclasses.is_dataclass(tp):
        fields = _fields(tp)
        return tp(**{k: from_json(v, fields[k], get_blob) for k, v in data.items() if k in fields})
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [from_json(v, item, get_blob) for v in data]
    if typing.get_origin(tp) is dict:
        return dict(data)
    return data


# ----------------------------------------------------------------------------- operations


def wire_name(parameter: str, tp: Any) -> str:
    """A photo parameter (``bytes``) travels as ``photo``; the rest under their own names."""
    return PHOTO if bytes in (tp, _optional(tp)) else parameter


def photo_parameter(declared: Operation) -> str | None:
    """The operation's photo parameter, if it takes one."""
    for p in declared.parameters:
        if wire_name(p.name, p.annotation) == PHOTO:
            return p.name
    return None


def arguments_to_json(declared: Operation, arguments: dict[str, Any], put_blob: PutBlob) -> JSON:
    """A bot's call (arguments by name) as the task's keyword arguments."""
    return {
        wire_name(p.name, p.annotation): to_json(arguments[p.name], p.annotation, put_blob)
        for p in declared.parameters
    }


def task_kwargs(declared: Operation, args: tuple, kwargs: JSON) -> JSON:
    """A task's arguments by wire name (positional ones in the declared order)."""
    names = [wire_name(p.name, p.annotation) for p in declared.parameters]
    if len(args) > len(names):
        raise TypeError(f"{declared.name}: {len(args)} positional arguments for {len(names)}")
    positional = dict(zip(names, args, strict=False))
    twice = set(positional) & set(kwargs)
    if twice:
        raise TypeError(f"{declared.name}: arguments given twice {sorted(twice)}")
    return {**positional, **kwargs}


def arguments_from_json(declared: Operation, kwargs: JSON, get_blob: GetBlob) -> dict[str, Any]:
    """A task's arguments (by wire name, see :func:`task_kwargs`) as the engine call's,
    defaults filled in; anything that does not fit the declaration raises TypeError (a bot
    and worker out of step: a bug)."""
    names = {wire_name(p.name, p.annotation): p for p in declared.parameters}
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"{declared.name}: unexpected arguments {sorted(unknown)}")
    arguments = {
        names[key].name: from_json(value, names[key].annotation, get_blob)
        for key, value in kwargs.items()
    }
    return declared.bind((), arguments)


def result_to_json(declared: Operation, result: Any, put_blob: PutBlob) -> JSON:
    data = to_json(result, declared.result, put_blob)
    return data if declared.result_key is None else {declared.result_key: data}


def result_from_json(declared: Operation, data: JSON, get_blob: GetBlob) -> Any:
    value = data if declared.result_key is None else data[declared.result_key]
    return from_json(value, declared.result, get_blob)
