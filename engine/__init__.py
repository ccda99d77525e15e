"""The RAP engine: remember, retrieve and answer about a chat's concepts; no chat-platform code."""
