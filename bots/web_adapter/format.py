"""A core Reply as the JSON event the page shows: text, the annotated photo, search results."""

from __future__ import annotations

import logging

from bots.core.messages import Reply
from bots.web_adapter.files import PhotoFolder, data_url, thumbnail_url
from engine.errors import RapbotError
from engine.images import ImageLimits

log = logging.getLogger(__name__)


def reply_event(reply: Reply, photos: PhotoFolder, limits: ImageLimits) -> dict:
    """``photos``: each search result's thumbnail (inline), or None for a result this chat
    cannot show (a source from an imported archive, a photo no longer kept)."""
    results: list[str | None] = []
    for source in reply.photo_refs:
        photo = photos.photo_for_source(source)
        try:
            results.append(thumbnail_url(photo, limits) if photo is not None else None)
        except RapbotError as error:  # a kept file that no longer decodes
            log.warning("search result not shown: %s", error)
            results.append(None)
    return {
        "event": "reply",
        "text": reply.text,
        "error": reply.error,
        "image": data_url(reply.image) if reply.image is not None else None,
        "image_name": reply.image_name if reply.image is not None else None,
        "concepts": [r.name for r in reply.concepts],
        "photos": results,
    }
