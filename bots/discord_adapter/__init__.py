"""rapbot on Discord (discord.py 2.x) over the shared chat core: app.py (the client and
``run_bot``), handlers.py (events → requests), send.py (the port), files.py, format.py."""

from bots.discord_adapter.app import TOKEN_ENV, RapbotBot, run_bot

__all__ = ["TOKEN_ENV", "RapbotBot", "run_bot"]
