"""Structured logs: which chat, which Celery task and which command every log line is about.

Three context fields travel with the work through :mod:`contextvars`:

* ``scope``: the chat (``tg:<chat_id>``, ``dc:<channel_id>``, ``local``);
* ``task_id``: the Celery task id (workers);
* ``command``: the chat command's name (``who``, ``ask``...; never its arguments).

:func:`log_context` sets them for a block (the command core sets scope and command around a
request, the worker sets task_id and scope around a task); :class:`ContextFilter` copies them
onto every record that reaches the handler installed by :func:`configure_logging`, which writes
either a readable line (``text``) or one JSON object per line (``json``) with ``ts`` (ISO 8601,
UTC), ``level``, ``logger``, ``message``, the context fields that are set, and ``exc`` (the
formatted traceback) when there is one.

Privacy (see DESIGN.md, "Scopes and privacy"): the context holds ids only. Nothing here logs
what users wrote, their names or their photos, and callers must not put them in messages
either: a scope id is as far as a log line goes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Literal

FIELDS = ("scope", "task_id", "command")
FORMATS = ("text", "json")
_TEXT_NAMES = {"scope": "scope", "task_id": "task", "command": "command"}

_vars: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"rapbot_log_{name}", default=None) for name in FIELDS
}


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Set ``scope``, ``task_id`` and/or ``command`` for the block (None clears one); the
    previous values come back on exit. Context variables follow the code into coroutines and
    tasks it starts (and into threads where the context is copied, as LocalGateway does)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(
            f"log_context() takes {', '.join(FIELDS)}, not {', '.join(sorted(unknown))}"
        )
    tokens = [
        (_vars[name], _vars[name].set(None if value is None else str(value)))
        for name, value in fields.items()
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Puts the context fields on every record (None when not set); values a caller passed in
    ``extra=`` are kept. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _vars.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


def _context_of(record: logging.LogRecord) -> dict[str, str]:
    found = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = _vars[name].get()  # a record that did not pass through ContextFilter
        if value is not None:
            found[name] = str(value)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, scope/task_id/command when set,
    exc (and stack) when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc)
        out: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_context_of(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:00,123 INFO rapbot.worker [scope=tg:1 task=ab12 command=who] text``;
    the bracket only when a context field is set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rapbot_context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = _context_of(record)
        record.rapbot_context = (
            " [" + " ".join(f"{_TEXT_NAMES[k]}={v}" for k, v in context.items()) + "]"
            if context
            else ""
        )
        return super().format(record)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    text = str(level).strip().upper()
    if text.isdigit():
        return int(text)
    value = logging.getLevelName(text)
    if not isinstance(value, int):
        raise ValueError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    return value


def _is_plain_console_handler(handler: logging.Handler) -> bool:
    """A handler like ``logging.basicConfig`` or Celery installs: exactly a StreamHandler on
    stderr/stdout (subclasses such as pytest's capture handlers or files are left alone)."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (as logging's own
    last-resort handler does): a replaced stderr (a test's capture, a daemon's redirect) never
    leaves the handler writing into a closed stream. ``setStream`` pins a stream (tests)."""

    def __init__(self) -> None:
        super().__init__()
        self._pinned = None

    @property
    def stream(self):
        return self._pinned if self._pinned is not None else sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        self._pinned = None if value is sys.stderr else value

    def setStream(self, stream):  # noqa: N802 - logging's name
        old, self._pinned = self._pinned, stream
        return old


def configure_logging(
    level: str = "INFO", fmt: Literal["text", "json"] = "text"
) -> logging.Handler:
    """Install rapbot's handler (stderr, :class:`ContextFilter`, the ``fmt`` formatter) on the
    root logger and set its level; returns the handler.

    Idempotent: a second call reconfigures the same handler instead of adding one. A plain
    console handler left by ``logging.basicConfig`` (or Celery) is replaced, so lines are not
    written twice; other handlers (files, test capture) stay."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use {' or '.join(FORMATS)}")
    numeric = _level(level)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "rapbot_handler", False)), None)
    for other in [h for h in root.handlers if h is not handler and _is_plain_console_handler(h)]:
        root.removeHandler(other)
    if handler is None:
        handler = _StderrHandler()
        handler.rapbot_handler = True  # type: ignore[attr-defined]
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.rapbot_format = fmt  # type: ignore[attr-defined]
    root.setLevel(numeric)
    return handler


def configured() -> logging.Handler | None:
    """rapbot's root handler, when :func:`configure_logging` installed one."""
    return next(
        (h for h in logging.getLogger().handlers if getattr(h, "rapbot_handler", False)), None
    )
