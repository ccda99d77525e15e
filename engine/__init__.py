"""The RAP engine: remember, retrieve and answer about a chat's concepts; no chat-platform code.

``from engine import Engine`` is the entry point. It is resolved lazily so that importing a light
module of this package (``engine.types``, ``engine.errors``) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.engine import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
