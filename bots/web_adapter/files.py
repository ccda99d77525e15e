"""Uploads of the web chat: read within the limits, checked before any work, and the chat's
indexed photos kept so that /search can show them again.

A photo posted while /index is on is indexed with the source ``web-photo:<sha256>`` and its
bytes are kept as ``<photos dir>/<sha256>.jpg``. A search result is shown only when its source
has exactly that form and the file is there: sources can come from an imported archive, so a
path or a URL in their place is never opened (see :func:`photo_for_source`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import shutil
from pathlib import Path

from starlette.datastructures import UploadFile

from engine.errors import InvalidInputError
from engine.images import ImageLimits, decode_image, encode_jpeg, thumbnail

SOURCE_PREFIX = "web-photo:"
USER_PREFIX = "web:"  # the web chat <name> is the scope and the user web:<name>
# A chat name is a folder name under <data folder>/web: no separators, and not "." or "..".
_CHAT_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}")
_SOURCE = re.compile(r"web-photo:([0-9a-f]{64})")
THUMBNAIL_SIDE = 320  # px, search results and posted photos in the page


async def read_upload(upload: UploadFile, limits: ImageLimits) -> bytes:
    """The upload's bytes, refused with the same one-line messages as every adapter's: too
    large, empty, not an image, corrupt, too many pixels (:func:`decode_image` decides; the
    request body itself is capped by the app before it is read)."""
    data = await upload.read()
    decode_image(data, limits)  # raises ImageError with the reason
    return data


def source_of(photo: bytes) -> str:
    return SOURCE_PREFIX + hashlib.sha256(photo).hexdigest()


class PhotoFolder:
    """The chat's indexed photos, by content digest."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def keep(self, source: str, photo: bytes) -> None:
        match = _SOURCE.fullmatch(source)
        if match is None:
            raise ValueError(f"not a web photo source: {source!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{match.group(1)}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(photo)
            tmp.replace(path)

    def photo_for_source(self, source: str) -> bytes | None:
        """The kept photo of a search result, or None for any source this chat did not make."""
        match = _SOURCE.fullmatch(source)
        if match is None:
            return None
        path = self.root / f"{match.group(1)}.jpg"
        return path.read_bytes() if path.is_file() else None

    def clear(self) -> None:
        """After /index off or /forget_me: the photos go with their index entries."""
        shutil.rmtree(self.root, ignore_errors=True)


def is_chat_name(name: str) -> bool:
    return _CHAT_NAME.fullmatch(name) is not None


def check_chat_name(name: str) -> str:
    if not is_chat_name(name):
        raise InvalidInputError(
            "A web chat name is 1 to 64 letters, digits, '.', '_' or '-', and not '.' or '..'"
            " (e.g. --user ada)."
        )
    return name


def photos_dir(data_dir: Path, name: str) -> Path:
    """Where the web chat ``name`` keeps its indexed photos (``name`` checked first)."""
    check_chat_name(name)
    return Path(data_dir).expanduser() / "web" / name / "photos"


def user_folders(data_dir: Path, user: str) -> list[Path]:
    """The folders the web chat keeps for ``user`` (``web:<name>``): its indexed photos, which
    ``rapbot forget-user`` deletes with the user's data in the stores. None for another
    platform's user or a name no web chat can have (never a path outside ``web/``)."""
    prefix, _, name = user.partition(":")
    if f"{prefix}:" != USER_PREFIX or not is_chat_name(name):
        return []
    return [photos_dir(data_dir, name)]


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnail_url(photo: bytes, limits: ImageLimits, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG of a photo, inline (the page never fetches photos by path)."""
    picture = decode_image(photo, limits)
    out = io.BytesIO(encode_jpeg(thumbnail(picture, side), quality=85))
    return data_url(out.getvalue())
