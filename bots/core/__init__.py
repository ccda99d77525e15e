"""The platform-neutral chat core shared by every adapter.

A new chat surface builds a :class:`ChatRequest` and implements a :class:`ChatPort` (see
:mod:`bots.core.request`), then calls ``CommandCore.serve(request, port)`` (:mod:`bots.core.serve`).

The names resolve on first use (PEP 562): the command line imports ``bots.core.replies`` and
``bots.core.commands`` and must not pay for the core's metrics and gateway.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "BaseCommand": "bots.core.commands",
    "Command": "bots.core.commands",
    "parse_command": "bots.core.commands",
    "Reply": "bots.core.messages",
    "BasePort": "bots.core.request",
    "ChatPort": "bots.core.request",
    "ChatRequest": "bots.core.request",
    "CollectingPort": "bots.core.request",
    "Sender": "bots.core.request",
    "user_id": "bots.core.request",
    "CommandCore": "bots.core.serve",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
