"""Attachments in (checked before download) and photos out (checked against the upload limit).

Discord tells us an attachment's size and content type up front, so a 60 MB upload or a PDF
is refused without fetching a byte; what is fetched is then decoded by the engine, which is
the authority on what counts as an image.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import aiohttp
import discord

from engine.errors import RapbotError
from engine.images import ImageLimits, decode_image, encode_jpeg, thumbnail

log = logging.getLogger(__name__)

# Uploads in DMs (and anywhere Discord does not tell us better) may be this large.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0
# Used when Discord omits an attachment's content type.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"}
)
SUPPORTED = "JPEG, PNG, WebP or GIF"


class AttachmentError(RapbotError):
    """An attachment we will not use; the message says why and what to send instead."""


class AttachmentDownloadError(AttachmentError):
    """Discord would not give us the attachment's bytes (our side or theirs, not the user's)."""

    outcome = "internal_error"


@dataclass(frozen=True)
class Photo:
    """An image attachment as the core's photo reference: equal, hashed and logged by its id
    (``str(attachment)`` is its URL, which ends in the name the user gave the file)."""

    id: int
    attachment: discord.Attachment = field(compare=False)

    @classmethod
    def of(cls, attachment: discord.Attachment) -> Photo:
        return cls(attachment.id, attachment)

    def __str__(self) -> str:
        return str(self.id)


def _megabytes(n: int, exact: bool = False) -> str:
    """As the engine words sizes: ``60.0 MB`` for a file, ``20 MB`` for a round limit."""
    value = n / (1024 * 1024)
    return f"{int(value)} MB" if exact and value == int(value) else f"{value:.1f} MB"


def _shown_name(attachment: discord.Attachment) -> str:
    return attachment.filename[:80]


def is_image(attachment: discord.Attachment) -> bool:
    content_type = (attachment.content_type or "").split(";", 1)[0].strip().lower()
    if content_type:
        return content_type.startswith("image/")
    return PurePosixPath(attachment.filename.lower()).suffix in IMAGE_EXTENSIONS


def _not_an_image(attachment: discord.Attachment) -> AttachmentError:
    kind = f" ({attachment.content_type})" if attachment.content_type else ""
    return AttachmentError(
        f"{_shown_name(attachment)}{kind} is not an image. Attach a photo ({SUPPORTED})."
    )


def check_attachment(attachment: discord.Attachment, limits: ImageLimits) -> None:
    """Refuse, before downloading, an attachment that is not an image or is too large."""
    if not is_image(attachment):
        raise _not_an_image(attachment)
    if attachment.size <= 0:
        raise AttachmentError(f"{_shown_name(attachment)} is empty. Attach a photo ({SUPPORTED}).")
    if attachment.size > limits.max_bytes:
        raise AttachmentError(
            f"The image is too large ({_megabytes(attachment.size)}); "
            f"the limit is {_megabytes(limits.max_bytes, exact=True)}."
        )


def pick_image(attachments: Sequence[discord.Attachment]) -> discord.Attachment | None:
    """The first image among ``attachments``; None when there are none at all.

    Attachments that are all something else get the not-an-image error, so a user who
    attached a PDF hears why nothing happened.
    """
    for attachment in attachments:
        if is_image(attachment):
            return attachment
    if attachments:
        raise _not_an_image(attachments[0])
    return None


async def download(
    attachment: discord.Attachment, limits: ImageLimits, timeout: float = DOWNLOAD_TIMEOUT_S
) -> bytes:
    """The attachment's bytes, after the checks; AttachmentError when Discord won't give them."""
    check_attachment(attachment, limits)
    try:
        data = await asyncio.wait_for(attachment.read(), timeout)
    except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        # Not the error's text: an aiohttp error shows the URL, which ends in the file's name.
        status = getattr(error, "status", None)
        log.warning(
            "attachment download failed id=%s: %s%s",
            attachment.id,
            type(error).__name__,
            f" (status {status})" if status is not None else "",
        )
        raise AttachmentDownloadError(
            f"I couldn't download {_shown_name(attachment)} from Discord. "
            "Please attach it again in a moment."
        ) from None
    if len(data) > limits.max_bytes:  # the size Discord announced was wrong
        raise AttachmentError(
            f"The image is too large ({_megabytes(len(data))}); "
            f"the limit is {_megabytes(limits.max_bytes, exact=True)}."
        )
    return data


def upload_limit(interaction: discord.Interaction | None = None, guild=None) -> int:
    """How large a file the bot may upload here (the interaction says; else the guild's tier)."""
    limit = getattr(interaction, "filesize_limit", None) if interaction is not None else None
    if isinstance(limit, int) and limit > 0:
        return limit
    if guild is None and interaction is not None:
        guild = interaction.guild
    return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT


def _shrink(jpeg: bytes, limit: int) -> bytes | None:
    """A smaller JPEG of the same picture that fits ``limit`` bytes, or None."""
    try:
        image = decode_image(jpeg, ImageLimits(max_bytes=max(len(jpeg), 1)))
    except RapbotError:
        return None
    side = max(image.size)
    for _ in range(6):
        # Bytes scale roughly with the pixel count: aim a little under the limit.
        side = max(64, int(side * min(0.9, (limit / max(len(jpeg), 1)) ** 0.5)))
        jpeg = encode_jpeg(thumbnail(image, side), quality=80)
        if len(jpeg) <= limit:
            return jpeg
        if side == 64:
            break
    return None


async def fit_upload(jpeg: bytes | None, limit: int) -> tuple[bytes | None, str]:
    """The photo to upload (re-encoded smaller if needed) and a note when it had to go."""
    if jpeg is None or len(jpeg) <= limit:
        return jpeg, ""
    smaller = await asyncio.to_thread(_shrink, jpeg, limit)
    if smaller is not None:
        return smaller, "(The annotated photo was made smaller to fit Discord's upload limit.)"
    return None, "(The annotated photo is too large to upload here.)"
