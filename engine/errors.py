"""Errors a user or operator can cause.

Every subclass of :class:`RapbotError` carries a message written for the person in the chat
(or at the terminal): adapters show ``str(error)`` as is and never a traceback.
"""

from __future__ import annotations

from typing import ClassVar


class RapbotError(Exception):
    """Base class: the message is safe and meant to be shown to the user.

    ``outcome`` is whose failure it is, as metrics count it: ``user_error`` (the user can fix
    it: a bad photo, an unknown name...) or ``internal_error`` (the service's: an outage, a
    broken store), though the user gets the message either way."""

    outcome: ClassVar[str] = "user_error"


class ImageError(RapbotError):
    """The upload is not a usable image (empty, not an image, truncated, too large...)."""


class InvalidInputError(RapbotError):
    """A name, description, box, scope or command argument is malformed."""


class NameTakenError(InvalidInputError):
    """A new concept's name is already remembered in the chat (stores raise it atomically with
    the insert, so a concurrent /remember of one new name can add its photo instead)."""


class UnknownConceptError(RapbotError):
    """A command names a concept that this chat has not remembered."""


class PermissionDeniedError(RapbotError):
    """The user may not change this concept (only its owner or a chat admin may)."""


class MissingWeightError(RapbotError):
    """A model weight file is not available locally and cannot be downloaded."""

    outcome = "internal_error"


class StoreError(RapbotError):
    """The concept store cannot be opened or used (wrong embedding model, corruption...)."""

    outcome = "internal_error"


class EngineUnavailableError(RapbotError):
    """Distributed mode: the broker, the result backend or every worker is down or too busy."""

    outcome = "internal_error"


class PhotoExpiredError(RapbotError):
    """Distributed mode: a photo's blob expired (or vanished) before a worker fetched it."""

    outcome = "internal_error"


class RepeatedCrashError(RapbotError):
    """Distributed mode: a request crashed its worker on every delivery up to the retry cap."""

    outcome = "internal_error"
