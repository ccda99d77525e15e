"""Which photo a message is about, and downloading it within the size limits.

A command's photo is the message's own (a photo's largest size, or an image sent as a file) or
the photo of the message it replies to. Sizes are checked from Telegram's metadata before
anything is downloaded, again from ``getFile``, and once more on the bytes received.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

from telegram import Bot, Message
from telegram.error import BadRequest, TelegramError

from engine.errors import ImageError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

# The Bot API's getFile serves files of at most 20 MB; bigger ones cannot be fetched at all.
TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 60.0

DOWNLOAD_FAILED = "I couldn't download that photo from Telegram. Please send it again."


class TelegramDownloadError(ImageError):
    """Telegram would not give us the file's bytes: the platform's failure, not the user's."""

    outcome = "internal_error"


# Media kinds we refuse by what they are, checked before ``document`` (a GIF is both).
_UNSUPPORTED_MEDIA = (
    ("animation", "animations or GIFs"),
    ("video", "videos"),
    ("video_note", "video messages"),
    ("sticker", "stickers"),
    ("audio", "audio files"),
    ("voice", "voice messages"),
)
_IMAGE_HINT = "Send a photo, or an image file (JPEG, PNG, WebP, GIF, BMP or TIFF)."


# Search sources of images sent as files: Telegram refuses a document's file id as a photo,
# so send.py sends these back as documents.
DOCUMENT_REF = "document:"
# A Telegram file id is URL-safe base64 of a binary record (type, dc, id, access hash...):
# real ones are 50-100 characters, never shorter than 20. Nothing else is ever sent as one.
_FILE_ID = re.compile(r"[A-Za-z0-9_-]{20,256}")


@dataclass(frozen=True)
class SentFile:
    """A search source this adapter may send back: a checked file id and how it was posted."""

    kind: Literal["photo", "document"]
    file_id: str


def sendable_source(source: str) -> SentFile | None:
    """The file id of a search ``source`` the Telegram adapter made (``<file id>`` or
    ``document:<file id>``), or None for anything else. Sources can come from an imported
    archive, so a path, a URL or a name of a local file must never pass (see send.py)."""
    kind: Literal["photo", "document"] = "photo"
    if source.startswith(DOCUMENT_REF):
        kind, source = "document", source.removeprefix(DOCUMENT_REF)
    return SentFile(kind, source) if _FILE_ID.fullmatch(source) else None


def is_telegram_source(source: str) -> bool:
    """Whether ``source`` is a search source of this adapter's form (bots.core.platforms)."""
    return sendable_source(source) is not None


@dataclass(frozen=True)
class Attachment:
    """A downloadable image: its Telegram file id and the size Telegram says it has."""

    file_id: str
    file_size: int | None
    what: str  # "photo" or "image file", for messages

    def __str__(self) -> str:  # how logs name it: by id, never by anything the user wrote
        return self.file_id

    @property
    def search_source(self) -> str:
        """What the photo is indexed as, to be sent again from search results: the file id
        (of the largest size, for a photo); ``document:<file id>`` for an image file."""
        return self.file_id if self.what == "photo" else DOCUMENT_REF + self.file_id


def attachment_of(message: Message) -> Attachment | None:
    """The image this message carries, None when it has none, ImageError for other media."""
    if message.photo:
        largest = message.photo[-1]  # sizes come smallest first
        return Attachment(largest.file_id, largest.file_size, "photo")
    for attribute, kind in _UNSUPPORTED_MEDIA:
        if getattr(message, attribute, None):
            raise ImageError(f"I can only look at photos and image files, not {kind}.")
    document = message.document
    if document is None:
        return None
    mime = (document.mime_type or "").lower()
    # Clients often label images as octet-stream: those are left to the decoder to judge.
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        name = (document.file_name or "This file")[:64]
        raise ImageError(f"{name} is not an image ({mime[:64]}). {_IMAGE_HINT}")
    return Attachment(document.file_id, document.file_size, "image file")


def photo_for(message: Message) -> Attachment | None:
    """The photo a command is about: the message's own, else the one it replies to."""
    own = attachment_of(message)
    if own is not None or message.reply_to_message is None:
        return own
    return attachment_of(message.reply_to_message)


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _too_large(attachment: Attachment, size: int | None, limit: int) -> ImageError:
    shown = f" ({_megabytes(size)})" if size else ""
    return ImageError(
        f"This {attachment.what} is too large{shown}: I can read images up to "
        f"{_megabytes(limit)}. Please send a smaller one."
    )


async def download(bot: Bot, attachment: Attachment, limits: ImageLimits) -> bytes:
    """The attachment's bytes, or ImageError with a message for the chat."""
    limit = min(limits.max_bytes, TELEGRAM_DOWNLOAD_LIMIT)
    if attachment.file_size is not None and attachment.file_size > limit:
        raise _too_large(attachment, attachment.file_size, limit)
    try:
        file = await bot.get_file(attachment.file_id)
        if file.file_size is not None and file.file_size > limit:
            raise _too_large(attachment, file.file_size, limit)
        data = await file.download_as_bytearray(read_timeout=DOWNLOAD_TIMEOUT_S)
    except BadRequest as error:
        if "too big" in str(error).lower():  # Telegram's own 20 MB limit
            raise _too_large(attachment, None, limit) from None
        log.warning("download refused file_id=%s: %s", attachment.file_id, error)
        raise TelegramDownloadError(DOWNLOAD_FAILED) from None
    except TelegramError as error:
        log.warning("download failed file_id=%s: %s", attachment.file_id, error)
        raise TelegramDownloadError(DOWNLOAD_FAILED) from None
    if len(data) > limit:
        raise _too_large(attachment, len(data), limit)
    return bytes(data)
