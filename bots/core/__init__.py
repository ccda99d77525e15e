"""The platform-neutral chat core shared by every adapter.

A new chat surface builds a :class:`ChatRequest` and implements a :class:`ChatPort` (see
:mod:`bots.core.request`), then calls ``CommandCore.serve(request, port)`` (:mod:`bots.core.serve`).
"""

from bots.core.commands import BaseCommand, Command, parse_command
from bots.core.messages import Reply
from bots.core.request import BasePort, ChatPort, ChatRequest, CollectingPort, Sender, user_id
from bots.core.serve import CommandCore

__all__ = [
    "BaseCommand",
    "BasePort",
    "ChatPort",
    "ChatRequest",
    "CollectingPort",
    "Command",
    "CommandCore",
    "Reply",
    "Sender",
    "parse_command",
    "user_id",
]
