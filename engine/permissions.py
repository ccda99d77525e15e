"""Who may change a concept: its owner (the user who remembered it) or a chat admin."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import PermissionDeniedError
from engine.types import Concept


@dataclass(frozen=True)
class Actor:
    """The user behind a request; ``is_admin`` is decided by the adapter (chat admin rights)."""

    user: str
    is_admin: bool = False


def ensure_can_edit(concept: Concept, actor: Actor, action: str) -> None:
    if actor.is_admin or actor.user == concept.owner:
        return
    raise PermissionDeniedError(
        f"Only the person who remembered {concept.name} or a chat admin can {action} it."
    )
