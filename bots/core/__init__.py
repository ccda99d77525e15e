"""The platform-neutral command core shared by every chat adapter."""

from bots.core.commands import Command, parse_command
from bots.core.handler import CommandCore
from bots.core.messages import IncomingMessage, Reply

__all__ = ["Command", "CommandCore", "IncomingMessage", "Reply", "parse_command"]
