"""Chat adapters (Telegram, Discord, the web chat, the terminal) over one platform-neutral command
core."""
