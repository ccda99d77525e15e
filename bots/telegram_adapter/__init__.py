"""rapbot on Telegram (python-telegram-bot v22) over the shared command core."""

from bots.telegram_adapter.app import build_application, rapbot_of, run_bot

__all__ = ["build_application", "rapbot_of", "run_bot"]
