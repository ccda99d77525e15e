"""The JSON shapes that cross the broker: engine values in and out, and errors as results.

Only JSON goes over the wire (no pickle: a worker must never unpickle what a bot sent). A
:class:`~engine.errors.RapbotError` raised by the engine is *returned*, as
``{"error": {"type": "UnknownConceptError", "message": "..."}}``: it is a normal answer for the
user, not a task failure, so Celery neither retries it nor logs a traceback, and the client
raises the same class again with the same message.
"""

from __future__ import annotations

import base64
from dataclasses import asdict
from typing import Any

from engine.errors import RapbotError
from engine.permissions import Actor
from engine.types import (
    Answer,
    Box,
    Concept,
    ConceptSheet,
    PhotoHit,
    Recognition,
    RememberResult,
    UnknownObject,
)

JSON = dict[str, Any]


# ----------------------------------------------------------------------------- errors


def error_result(error: RapbotError) -> JSON:
    return {"error": {"type": type(error).__name__, "message": str(error)}}


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def error_class(name: str) -> type[RapbotError]:
    """The RapbotError subclass called ``name`` (RapbotError itself if unknown here)."""
    import engine.errors  # noqa: F401  (every engine error class is defined)

    for cls in [RapbotError, *_subclasses(RapbotError)]:
        if cls.__name__ == name:
            return cls
    return RapbotError


def raise_for_error(result: Any) -> Any:
    """Raise the error a task returned; otherwise hand the result back unchanged."""
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        error = result["error"]
        raise error_class(str(error.get("type", "")))(str(error.get("message", "")))
    return result


# ----------------------------------------------------------------------------- values in


def box_to_json(box: Box | None) -> list[int] | None:
    return box.as_list() if box is not None else None


def box_from_json(value: Any) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        from engine.errors import InvalidInputError

        raise InvalidInputError("A box is four numbers: x1, y1, x2, y2.")
    return Box.from_xyxy(value)


def actor_to_json(actor: Actor) -> JSON:
    return {"user": actor.user, "is_admin": bool(actor.is_admin)}


def actor_from_json(value: JSON) -> Actor:
    return Actor(str(value["user"]), bool(value.get("is_admin", False)))


# ----------------------------------------------------------------------------- values out


def concept_to_json(concept: Concept) -> JSON:
    return asdict(concept)


def concept_from_json(value: JSON) -> Concept:
    return Concept(**value)


def concept_sheet_to_json(sheet: ConceptSheet, image_key: str | None = None) -> JSON:
    """The page with its picture replaced by a blob key (pictures go by reference)."""
    return {
        "concepts": [concept_to_json(c) for c in sheet.concepts],
        "page": sheet.page,
        "pages": sheet.pages,
        "total": sheet.total,
        "image": image_key,
    }


def concept_sheet_from_json(value: JSON, image: bytes | None = None) -> ConceptSheet:
    concepts = [concept_from_json(c) for c in value["concepts"]]
    return ConceptSheet(
        concepts, int(value["page"]), int(value["pages"]), int(value["total"]), image
    )


def crops_to_json(crops: list[bytes]) -> JSON:
    """Example crops are small JPEGs: inline, base64."""
    return {"crops": [base64.b64encode(c).decode("ascii") for c in crops]}


def crops_from_json(value: JSON) -> list[bytes]:
    return [base64.b64decode(c, validate=True) for c in value["crops"]]


def remember_to_json(result: RememberResult) -> JSON:
    return {
        "concept": concept_to_json(result.concept),
        "box": result.box.as_list(),
        "created": result.created,
    }


def remember_from_json(value: JSON) -> RememberResult:
    return RememberResult(
        concept_from_json(value["concept"]), Box(*value["box"]), bool(value["created"])
    )


def answer_to_json(answer: Answer, image_key: str | None = None) -> JSON:
    """The answer with its annotated photo replaced by a blob key (photos go by reference)."""
    return {
        "text": answer.text,
        "concepts": [{**asdict(r), "box": box_to_json(r.box)} for r in answer.concepts],
        "unknown": [{**asdict(u), "box": box_to_json(u.box)} for u in answer.unknown],
        "image": image_key,
        "timings": dict(answer.timings),
    }


def answer_from_json(value: JSON, image: bytes | None = None) -> Answer:
    concepts = [Recognition(**{**r, "box": box_from_json(r["box"])}) for r in value["concepts"]]
    unknown = [UnknownObject(**{**u, "box": box_from_json(u["box"])}) for u in value["unknown"]]
    return Answer(value["text"], concepts, unknown, image, dict(value.get("timings", {})))


def photo_hits_to_json(hits: list[PhotoHit]) -> JSON:
    return {"results": [asdict(hit) for hit in hits]}


def photo_hits_from_json(value: JSON) -> list[PhotoHit]:
    return [
        PhotoHit(int(h["photo_id"]), float(h["score"]), str(h["source"])) for h in value["results"]
    ]
