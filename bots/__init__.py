"""Chat adapters (terminal, Telegram, Discord) over one platform-neutral command core."""
