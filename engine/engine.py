"""The engine facade: remember, recognize, ask, caption and manage a scope's concepts.

Inputs and outputs are plain data (image bytes, strings, dataclasses from :mod:`engine.types`)
so the same object serves in-process (local mode) and behind a Celery task (distributed mode).
Every method takes the scope explicitly and touches nothing outside it, except
:meth:`Engine.forget_user`, which by design removes one user's data from every scope.
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from engine.answers import ask_sentence, caption_sentence, rough_position, who_sentence
from engine.categories import category_from_text
from engine.contact_sheet import PAGE_SIZE, SheetTile, check_page, page_count, render_contact_sheet
from engine.errors import (
    ImageError,
    InvalidInputError,
    MissingWeightError,
    NameTakenError,
    PermissionDeniedError,
    StoreError,
    UnknownConceptError,
)
from engine.generator.rap import build_prompt, candidates
from engine.images import ImageLimits, crop, decode_image, encode_jpeg, thumbnail
from engine.permissions import Actor, ensure_can_edit
from engine.render import annotate_jpeg
from engine.retriever import (
    CROP_PAD,
    RAP_DETECTOR_CONFIDENCE,
    Region,
    RegionMatch,
    Retriever,
    named_concepts,
    regions_from_detections,
    retrieval_policy,
    same_object,
)
from engine.selection import select_region
from engine.settings import EngineSettings
from engine.store import open_concept_store
from engine.store.base import ConceptStore
from engine.timing import StageTimer
from engine.types import (
    Answer,
    Box,
    Concept,
    ConceptSheet,
    Detection,
    PhotoHit,
    Recognition,
    RememberResult,
    UnknownObject,
)
from engine.validation import (
    TextLimits,
    clean_category,
    clean_description,
    clean_name,
    clean_scope,
    clean_source,
    clean_user,
    normalise_name,
    refuse_look_alike,
)

if TYPE_CHECKING:
    from engine.models import Models
    from engine.store.photos import PhotoStore

log = logging.getLogger(__name__)

MAX_QUESTION_LENGTH = 1000


@dataclass(frozen=True)
class EngineParts:
    """What an engine holds open right now, for metrics and health checks: looking at it
    loads no model and opens no index."""

    models: Models | None  # None: a store-only engine, or one whose models are not loaded yet
    store: ConceptStore
    photos: PhotoStore | None  # None until the photo history was first used


class Engine:
    """RAP over one store: Remember, Retrieve, and Generate with the configured multimodal
    LLM (``models.generator``), or recognition-only answers without one."""

    def __init__(self, settings: EngineSettings, models, store: ConceptStore) -> None:
        """``models=None`` makes a store-only engine (distributed mode's cpu queue): list,
        rename, describe and forget work at once; the models load on first use, if ever."""
        self.settings = settings
        self._models = models
        self._retriever: Retriever | None = None
        self.store = store
        self.limits = ImageLimits.from_settings(settings)
        self.text_limits = TextLimits.from_settings(settings)  # the import path's too
        self._photos = None  # the photo history for /search, opened on first use
        self._photos_lock = threading.Lock()
        self._cir = None  # the CIR-LVLM search encoder (search_encoder=cir-lvlm), on first use

    @property
    def models(self):
        if self._models is None:
            from engine.models import load_models

            models = load_models(self.settings)  # memoised and locked per settings
            if models.embedder.model_id != self.store.model_id:  # see open_store
                raise StoreError(
                    f"The memory store was made with {self.store.model_id}, but the configured"
                    f" model is {models.embedder.model_id}: its memories cannot be searched"
                    " with it. Use the store's model (RAPBOT_PROFILE, RAPBOT_CLIP_*)."
                )
            self._models = models
        return self._models

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            models = self.models
            self._retriever = Retriever(
                self.store,
                models.embedder,
                threshold=models.match_threshold,
                top_k=self.settings.top_k,
            )
        return self._retriever

    @classmethod
    def open(cls, settings: EngineSettings | None = None, *, load_models: bool = True) -> Engine:
        """Load the profile's models and open the configured store (FAISS folder or Qdrant).

        ``load_models=False``: a store-only engine; the store is opened with the embedding
        model's identity (name and size), computed without loading any weights.
        """
        settings = settings or EngineSettings()
        if load_models:
            from engine.models import load_models as load  # heavy imports only when needed

            models = load(settings)
            model_id, dim = models.embedder.model_id, models.embedder.dim
        else:
            from engine.embedder import clip_identity
            from engine.profiles import resolve_profile

            profile = resolve_profile(settings)
            models = None
            model_id, dim = clip_identity(
                profile.clip_model, profile.clip_pretrained, settings, seed=profile.seed
            )
        store = open_concept_store(settings, model_id, dim)  # FAISS or Qdrant
        return cls(settings, models, store)

    @classmethod
    def open_store(cls, settings: EngineSettings | None = None) -> Engine:
        """A store-only engine on the store as it was made: opened with the embedding model
        recorded in it, so listing, renaming, forgetting and export need no model, no weights
        and no model library (a privacy deletion works with the CLIP weights gone). A new
        store, or a Qdrant one, is opened with the configured model's identity. The models
        still load on first use, and only if they are the store's (:attr:`models`)."""
        from engine.store import recorded_identity

        settings = settings or EngineSettings()
        identity = recorded_identity(settings)
        if identity is None:
            return cls.open(settings, load_models=False)
        return cls(settings, None, open_concept_store(settings, *identity))

    def loaded_parts(self) -> EngineParts:
        """The models, concept store and photo history this engine has loaded so far."""
        return EngineParts(self._models, self.store, self._photos)

    def close(self) -> None:
        self.store.close()
        if self._photos is not None:
            self._photos.close()

    @property
    def photos(self):
        """The scopes' photo histories: :class:`engine.store.photos.PhotoStore` in
        ``<data_dir>/photos`` (FAISS store), or :class:`engine.store.qdrant_photos.
        QdrantPhotoStore` on the concept store's Qdrant client (shared by every worker); keyed
        by the search encoder's identity: the concept store's CLIP model, or the CIR-LVLM
        encoder's (computed without loading it). An index made with
        another encoder still answers flags and deletions but refuses adds and searches with a
        message to re-index (:meth:`reindex_photos`). When the CIR-LVLM encoder's identity
        cannot be computed (``RAPBOT_SEARCH_MODEL`` empty, missing or not a trained folder), the
        index is opened with the identity it recorded itself: flags and deletions still work
        (``/forget_me``, ``/index off``), adds and searches raise the encoder's error."""
        with self._photos_lock:  # worker threads: one store, opened once
            if self._photos is None:
                self._photos = self._open_photos()
        return self._photos

    def _open_photos(self):
        from pathlib import Path

        client = getattr(self.store, "client", None)  # a Qdrant concept store's
        if client is not None:  # photos go where the concepts are: Qdrant, shared by workers
            from engine.store.qdrant_photos import QdrantPhotoStore as store_class

            where = {
                "client": client,
                "prefix": self.settings.qdrant_prefix,
                "where": self.store.where,
                "lock": self.store.lock,
                "shards": self.settings.qdrant_shards or None,
                "replication_factor": self.settings.qdrant_replication_factor or None,
            }
        else:
            from engine.store.photos import PhotoStore as store_class

            where = {"root": Path(self.settings.data_dir).expanduser() / "photos"}
        if self.settings.search_encoder != "cir-lvlm":
            return store_class(
                **where, model_id=self.store.model_id, dim=self.store.dim, strict=False
            )
        from engine.cir.search import cir_identity

        try:
            model_id, dim = cir_identity(self.settings)
        except (MissingWeightError, OSError) as error:
            if not isinstance(error, MissingWeightError):  # an unreadable file
                error = MissingWeightError(f"CIR-LVLM search model not readable: {error}")
            log.warning("photo index opened without its search encoder: %s", error)
            return store_class.unresolved(**where, error=error)
        return store_class(**where, model_id=model_id, dim=dim, strict=False)

    @property
    def search_encoder(self):
        """The CIR-LVLM encoder (:class:`engine.cir.search.CirSearchEncoder`) when
        ``search_encoder`` is ``cir-lvlm``, loaded on first use (once per process and device,
        under a lock); None for the CLIP embedder and the training-free composition."""
        if self.settings.search_encoder != "cir-lvlm":
            return None
        if self._cir is None:
            from engine.cir.search import load_search_encoder

            self._cir = load_search_encoder(self.settings)
        return self._cir

    def _embed_photos(self, pictures: list[Image.Image]):
        """Index-side embeddings of whole photos with the configured search encoder."""
        encoder = self.search_encoder
        if encoder is not None:
            return encoder.embed_targets(pictures)
        return self.models.embedder.embed_images(pictures)

    def embed_thumbnails(self, thumbnails: list[bytes]):
        """:meth:`_embed_photos` of stored thumbnails (JPEG bytes): re-indexing, and imports of
        another encoder's photo history (:func:`engine.backup.import_archive`)."""
        return self._embed_photos([decode_image(t, self.limits) for t in thumbnails])

    # ----------------------------------------------------------------------------- helpers

    def _decode(self, image: bytes, timer: StageTimer) -> Image.Image:
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise InvalidInputError("Send a photo (image bytes) with this command.")
        with timer.stage("decode"):
            return decode_image(bytes(image), self.limits)

    def categories(self, scope: str) -> list[str]:
        """The scope's categories the detector looks for: all of them, or when a chat has more
        than ``detector_max_categories``, those that most concepts have. An open-vocabulary
        detector's cost grows with its classes (5,000 imported categories made one /who 17x
        slower), and any chat member can add categories."""
        return self.store.categories(scope, limit=self.settings.detector_max_categories)

    def vocabulary(self, scope: str) -> list[str]:
        """The detector's classes for a scope: its (capped) categories, then the general list."""
        from engine.detector import GENERAL_VOCABULARY

        seen: set[str] = set()
        words: list[str] = []
        for word in [*self.categories(scope), *GENERAL_VOCABULARY]:
            if word and word.casefold() not in seen:
                seen.add(word.casefold())
                words.append(word)
        return words

    def _detect(
        self,
        scope: str,
        image: Image.Image,
        timer: StageTimer,
        vocabulary: list[str] | None = None,
        confidence: float | None = None,
    ) -> list[Detection]:
        """Detections at ``confidence`` or above (default: the setting; the detector itself
        may run lower for the rap policy), of ``vocabulary`` (default: :meth:`vocabulary`)."""
        vocabulary = self.vocabulary(scope) if vocabulary is None else vocabulary
        floor = self.settings.detector_confidence if confidence is None else confidence
        with timer.stage("detect"):
            found = self.models.detector.detect([image], vocabulary)[0]
        return [d for d in found if d.score >= floor]

    @property
    def retrieval_policy(self) -> str:
        """``rap`` or ``threshold``: how concepts are retrieved for the generator (see
        :mod:`engine.retriever`); ``threshold`` when there is no generator."""
        generator = ""
        if self.generator is not None:  # one given in code has no setting: "a model"
            generator = self.models.profile.generator or self.generator.name or "model"
        return retrieval_policy(
            self.settings.retrieval_policy, generator, self.settings.generator_adapter
        )

    def concept(self, scope: str, name: str) -> Concept:
        """The scope's concept called ``name`` (any case), or a helpful UnknownConceptError."""
        scope = clean_scope(scope)
        for candidate in dict.fromkeys([normalise_name(name), (name or "").strip()]):
            found = self.store.get_by_name(scope, candidate) if candidate else None
            if found is not None:
                return found
        known = [c.name for c in self.store.list_concepts(scope)]
        close = difflib.get_close_matches(name or "", known, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]}?" if close else ""
        if not known:
            hint = " Nobody has been remembered in this chat yet."
        raise UnknownConceptError(f"I don't know anyone called '{name}' here.{hint}")

    # ----------------------------------------------------------------------------- remember

    def remember(
        self,
        scope: str,
        image: bytes,
        name: str,
        description: str = "",
        user: str = "local",
        box: Box | None = None,
        source: str | None = None,
        category: str | None = None,
    ) -> RememberResult:
        """Store a new concept, or add an example photo when the name exists in the scope.

        ``source`` (e.g. the platform message id) makes the call idempotent: running it again
        stores nothing new.
        """
        scope = clean_scope(scope)
        name = clean_name(name, self.settings.max_name_length)
        description = clean_description(description, self.settings.max_description_length)
        user = clean_user(user)
        category = clean_category(category) if category else ""
        source = clean_source(source) if source is not None else None
        timer = StageTimer()
        picture = self._decode(image, timer)
        existing = self.store.get_by_name(scope, name)
        if existing is None:
            refuse_look_alike(name, [c.name for c in self.store.list_concepts(scope)])
        vocabulary = self.vocabulary(scope)
        wanted = (
            category
            or (existing.category if existing else "")
            or category_from_text(f"{name} {description}", vocabulary)
        )
        # Choose among the same de-duplicated regions that recognition looks at, so that the
        # photo a concept was remembered from is recognized from identical crop pixels.
        detections = [] if box is not None else self._detect(scope, picture, timer)
        candidates = [
            Detection(r.box, r.label, r.score)
            for r in regions_from_detections(detections, *picture.size)
            if r.label
        ]
        chosen = select_region(candidates, *picture.size, category=wanted, user_box=box)
        example = crop(picture, chosen.box, pad=CROP_PAD)
        with timer.stage("embed"):
            vector = self.models.embedder.embed_images([example])[0]
        crop_jpeg = encode_jpeg(example)
        created = False
        if existing is None:
            try:
                concept = self.store.add_concept(
                    scope,
                    name=name,
                    description=description,
                    category=wanted or chosen.label,
                    owner=user,
                    embedding=vector,
                    crop_jpeg=crop_jpeg,
                    box=chosen.box,
                    source=source,
                )
                created = True
            except NameTakenError:
                # Another request created this name since we looked: this photo joins it
                # (the store checks and inserts in one transaction, so one of them wins).
                existing = self.store.get_by_name(scope, name)
                if existing is None:  # created and forgotten meanwhile: let the user retry
                    raise
        if not created:
            concept = self.store.add_example(
                scope,
                existing.id,
                embedding=vector,
                crop_jpeg=crop_jpeg,
                box=chosen.box,
                source=source,
                added_by=user,
            )
        log.info(
            "remember scope=%s concept=%s created=%s crop=%s (%s)",
            scope,
            concept.id,
            created,
            chosen.box.as_list(),
            chosen.reason,
        )
        return RememberResult(concept=concept, box=chosen.box, created=created)

    # ----------------------------------------------------------------------------- recognize

    def _recognize(
        self, scope: str, picture: Image.Image, timer: StageTimer
    ) -> tuple[list[Recognition], list[UnknownObject], dict[str, str]]:
        """The threshold policy: who is recognized, what else is seen, and the owners."""
        width, height = picture.size
        regions: list[Region] = regions_from_detections(
            self._detect(scope, picture, timer), width, height
        )
        matches = self.retriever.retrieve(scope, picture, regions, timer)
        return self._readings(scope, picture, regions, matches, regions)

    def _rap_retrieve(
        self, scope: str, picture: Image.Image, timer: StageTimer
    ) -> tuple[list[Recognition], list[Recognition], list[UnknownObject], dict[str, str]]:
        """The rap policy, from one detection and one search: RAP's ranked candidates for the
        generator, then (for the annotated photo and the fallback sentence) the threshold's
        matches and the unmatched detections at the configured confidence."""
        width, height = picture.size
        categories = self.categories(scope)
        detections = (
            self._detect(scope, picture, timer, categories, RAP_DETECTOR_CONFIDENCE)
            if categories
            else []
        )
        regions = regions_from_detections(detections, width, height, merge_duplicates=False)
        ranked, matches = self.retriever.retrieve_both(scope, picture, regions, timer)
        candidates, _, owners = self._readings(scope, picture, regions, ranked, [])
        confident = [r for r in regions if r.score >= self.settings.detector_confidence]
        known, unknown, _ = self._readings(scope, picture, regions, matches, confident)
        return candidates, known, unknown, owners

    def _readings(
        self,
        scope: str,
        picture: Image.Image,
        regions: list[Region],
        matches: list[RegionMatch],
        seen: list[Region],
    ) -> tuple[list[Recognition], list[UnknownObject], dict[str, str]]:
        """Matches as Recognitions (in order), and the regions of ``seen`` that show no
        matched object as UnknownObjects; the concepts' owners."""
        width, height = picture.size
        known: list[Recognition] = []
        owners: dict[str, str] = {}
        for match in matches:
            concept = self.store.get(scope, match.concept_id)
            if concept is None:  # forgotten between search and lookup
                continue
            box = regions[match.region].box
            owners[concept.id] = concept.owner
            known.append(
                Recognition(
                    concept_id=concept.id,
                    name=concept.name,
                    description=concept.description,
                    category=concept.category,
                    score=round(float(match.score), 4),
                    box=box,
                    position=rough_position(box, width, height),
                )
            )
        matched = [regions[m.region] for m in matches]
        unknown = [
            UnknownObject(r.label, r.box, rough_position(r.box, width, height))
            for r in seen
            if r.label and not same_object(r, matched)
        ]
        return known, unknown, owners

    def recognize(
        self, scope: str, image: bytes, user: str | None = None, annotate: bool = True
    ) -> Answer:
        """Who and what of this scope is in the photo, in words and (optionally) drawn boxes."""
        scope = clean_scope(scope)
        timer = StageTimer()
        picture = self._decode(image, timer)
        known, unknown, owners = self._recognize(scope, picture, timer)
        if self.store.count(scope) == 0:
            text = "I don't know anyone in this chat yet, so I can't name anything in this photo."
        else:
            text = who_sentence(known, unknown, owners, user)
        rendered = None
        if annotate:
            with timer.stage("render"):
                rendered = annotate_jpeg(picture, known, unknown)
        return Answer(text, known, unknown, rendered, timer.seconds)

    def ask(
        self, scope: str, image: bytes | None, question: str, user: str | None = None
    ) -> Answer:
        """Answer a question about a photo or about remembered concepts: generated by the
        multimodal LLM from the RAP prompt when one is configured, else recognition-only."""
        if self.generator is not None:
            return _final(self.ask_stream(scope, image, question, user))
        scope, question = clean_scope(scope), _clean_question(question)
        timer = StageTimer()
        named = self.retriever.named_in(scope, question)
        if image is None:
            concepts = [
                Recognition(c.id, c.name, c.description, c.category, 1.0, None) for c in named
            ]
            return Answer(ask_sentence(named, [], [], {}, user, has_image=False), concepts)
        picture = self._decode(image, timer)
        known, unknown, owners = self._recognize(scope, picture, timer)
        text = ask_sentence(named, known, unknown, owners, user, has_image=True)
        with timer.stage("render"):
            rendered = annotate_jpeg(picture, known, unknown)
        return Answer(text, known, unknown, rendered, timer.seconds)

    def caption(self, scope: str, image: bytes, user: str | None = None) -> Answer:
        """A personalized caption: the photo described with the names of its concepts."""
        if self.generator is not None:
            return _final(self.caption_stream(scope, image, user))
        scope = clean_scope(scope)
        timer = StageTimer()
        picture = self._decode(image, timer)
        known, unknown, owners = self._recognize(scope, picture, timer)
        return Answer(
            caption_sentence(known, unknown, owners, user), known, unknown, None, timer.seconds
        )

    # ----------------------------------------------------------------------------- generate

    @property
    def generator(self):
        """The multimodal LLM of RAP's Generate step, or None: recognition-only answers."""
        return getattr(self.models, "generator", None)

    def ask_stream(
        self, scope: str, image: bytes | None, question: str, user: str | None = None
    ) -> Iterator[str | Answer]:
        """:meth:`ask` as it is generated: text pieces, then the final Answer, whose text is
        the pieces joined. Without a generator, the whole text is one piece."""
        if self.generator is None:
            yield from _whole(self.ask(scope, image, question, user))
            return
        scope, question = clean_scope(scope), _clean_question(question)
        timer = StageTimer()
        named = self.retriever.named_in(scope, question)
        picture, known, unknown, owners, ranked = None, [], [], {}, []
        if image is not None:
            picture = self._decode(image, timer)
            ranked, known, unknown, owners = self._retrieve_for_generation(scope, picture, timer)
        text, used = yield from self._generated(
            scope,
            question,
            picture,
            candidates(named, ranked),
            timer,
            lambda: ask_sentence(named, known, unknown, owners, user, has_image=image is not None),
        )
        rendered = None
        if picture is not None:
            with timer.stage("render"):
                rendered = annotate_jpeg(picture, known, unknown)
        yield Answer(text, used, unknown, rendered, timer.seconds)

    def caption_stream(
        self, scope: str, image: bytes, user: str | None = None
    ) -> Iterator[str | Answer]:
        """:meth:`caption` as it is generated: text pieces, then the final Answer."""
        if self.generator is None:
            yield from _whole(self.caption(scope, image, user))
            return
        scope = clean_scope(scope)
        timer = StageTimer()
        picture = self._decode(image, timer)
        ranked, known, unknown, owners = self._retrieve_for_generation(scope, picture, timer)
        text, used = yield from self._generated(
            scope,
            None,
            picture,
            candidates([], ranked),
            timer,
            lambda: caption_sentence(known, unknown, owners, user),
        )
        yield Answer(text, used, unknown, None, timer.seconds)

    def _retrieve_for_generation(
        self, scope: str, picture: Image.Image, timer: StageTimer
    ) -> tuple[list[Recognition], list[Recognition], list[UnknownObject], dict[str, str]]:
        """The generator's candidates under the retrieval policy, best first, then the
        recognized concepts, the unrecognized objects and the owners."""
        if self.retrieval_policy == "rap":
            return self._rap_retrieve(scope, picture, timer)
        known, unknown, owners = self._recognize(scope, picture, timer)
        return known, known, unknown, owners

    def _generated(
        self,
        scope: str,
        question: str | None,
        picture: Image.Image | None,
        ranked: list[Recognition],
        timer: StageTimer,
        fallback: Callable[[], str],
    ) -> Iterator[str]:
        """Streams the LLM's answer to the RAP prompt; returns (text, concepts shown to it)."""
        generator = self.generator
        with timer.stage("prompt"):
            prompt, used = build_prompt(generator, self.store, scope, question, picture, ranked)
        pieces: list[str] = []
        stream = generator.stream(prompt)
        try:
            while True:
                with timer.stage("generate"):  # only the model's time, not the consumer's
                    piece = next(stream, None)
                if piece is None:
                    break
                pieces.append(piece)
                yield piece
        finally:
            stream.close()  # a consumer that stops early stops the generation too
        text = "".join(pieces)
        if not text:  # the model said nothing at all: the recognition-only sentence instead
            text = fallback()
            yield text
        log.info("generated scope=%s concepts=%d chars=%d", scope, len(used), len(text))
        return text, used

    # ----------------------------------------------------------------------------- manage

    def list_concepts(self, scope: str) -> list[Concept]:
        return self.store.list_concepts(clean_scope(scope))

    def concept_sheet(self, scope: str, page: int = 1) -> ConceptSheet:
        """Page ``page`` (1-based) of the scope's concepts with their contact sheet; store only."""
        scope = clean_scope(scope)
        concepts = self.store.list_concepts(scope)
        page = check_page(page, len(concepts))
        shown = concepts[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        pages = page_count(len(concepts))
        if not shown:
            return ConceptSheet([], page, pages, 0)
        tiles = [
            SheetTile(c.name, c.owner, next(iter(self.store.example_crops(scope, c.id, 1)), None))
            for c in shown
        ]
        try:
            image = render_contact_sheet(tiles, page, pages, limits=self.limits)
        except Exception:  # noqa: BLE001 - the list still answers; the picture is a bonus
            log.exception("contact sheet failed scope=%s", scope)
            image = None
        return ConceptSheet(shown, page, pages, len(concepts), image)

    def example_crops(self, scope: str, name: str, limit: int | None = None) -> list[bytes]:
        """The JPEG crops of the concept called ``name``, first example first (``limit``: only
        that many are read); store only."""
        concept = self.concept(scope, name)
        return self.store.example_crops(concept.scope, concept.id, limit=limit)

    def rename(self, scope: str, name: str, new_name: str, actor: Actor) -> Concept:
        concept = self.concept(scope, name)
        ensure_can_edit(concept, actor, "rename")
        new_name = clean_name(new_name, self.settings.max_name_length)
        others = [c.name for c in self.store.list_concepts(concept.scope) if c.id != concept.id]
        refuse_look_alike(new_name, others)
        return self.store.rename(concept.scope, concept.id, new_name)

    def describe(self, scope: str, name: str, description: str, actor: Actor) -> Concept:
        concept = self.concept(scope, name)
        ensure_can_edit(concept, actor, "change the description of")
        description = clean_description(description, self.settings.max_description_length)
        return self.store.describe(concept.scope, concept.id, description)

    def forget(self, scope: str, name: str, actor: Actor) -> Concept:
        concept = self.concept(scope, name)
        ensure_can_edit(concept, actor, "forget")
        self.store.delete(concept.scope, concept.id)
        log.info("forget scope=%s concept=%s by=%s", concept.scope, concept.id, actor.user)
        return replace(concept, examples=0)

    def forget_user(self, user: str) -> int:
        """Remove every concept the user remembered and every photo they posted (the search
        history), in every scope; returns how many concepts. Needs no model: the photos go
        even when the search encoder cannot be loaded (see :attr:`photos`)."""
        user = clean_user(user)
        removed = self.store.delete_user(user)
        photos = self.photos.delete_user(user)
        log.info("forget_user removed=%d photos=%d", removed, photos)
        return removed

    # ----------------------------------------------------------------------------- search

    def indexing(self, scope: str) -> bool:
        """Whether the scope's photos are being indexed for search (off until an admin says)."""
        return self.photos.indexing(clean_scope(scope))

    def set_indexing(self, scope: str, enabled: bool, actor: Actor, delete: bool = False) -> int:
        """Turn the scope's photo indexing on or off (chat admins only); switching off with
        ``delete`` forgets the scope's indexed photos. Returns how many photos were forgotten."""
        scope = clean_scope(scope)
        if not actor.is_admin:
            raise PermissionDeniedError("Only a chat admin can turn photo indexing on or off.")
        self.photos.set_indexing(scope, bool(enabled))
        removed = self.photos.delete_scope(scope) if (delete and not enabled) else 0
        log.info("indexing scope=%s on=%s removed=%d by=%s", scope, enabled, removed, actor.user)
        return removed

    def index_photo(
        self,
        scope: str,
        image: bytes,
        user: str,
        source: str,
        posted_at: float | None = None,
        force: bool = False,
    ) -> int | None:
        """Add a posted photo to the scope's search history (embedding + thumbnail): its photo
        id, or None when the scope's indexing is off (``force``: index anyway, for the CLI's
        own files). Idempotent by ``source`` (Telegram file id, Discord message link, path).
        The flag is checked before embedding (to save the work) and again when the photo is
        written, so one posted just before ``/index off`` is not stored after it."""
        scope, user, source = clean_scope(scope), clean_user(user), clean_source(source)
        if not force and not self.photos.indexing(scope):
            return None
        timer = StageTimer()
        picture = self._decode(image, timer)
        with timer.stage("embed"):
            vector = self._embed_photos([picture])[0]
        thumb = encode_jpeg(thumbnail(picture, 256), quality=85)
        return self.photos.add(
            scope, vector, thumb, user, posted_at, source, require_indexing=not force
        )

    def reindex_photos(self, force: bool = False) -> int:
        """:meth:`reindex_report`'s count of re-embedded photos."""
        return self.reindex_report(force).photos

    def reindex_report(self, force: bool = False) -> ReindexReport:
        """Re-embed every indexed photo (all scopes) with the configured search encoder, from
        the stored thumbnails, after switching encoders. Does nothing (0 photos) when the index
        already comes from the configured encoder, since 256-pixel thumbnails give worse
        vectors than the photos did; ``force`` re-embeds anyway. A thumbnail the safe decoder
        refuses (an archive's, a damaged file's) is forgotten first and reported with its chat,
        so one bad photo cannot stop the re-index of every chat half-way."""
        if not force and self.photos.mismatch is None:
            log.info("reindex_photos model=%s: already matches", self.photos.model_id)
            return ReindexReport(0, {})
        skipped = self._drop_unreadable_photos()
        count = self.photos.reembed(self.embed_thumbnails)
        log.info("reindex_photos model=%s photos=%d", self.photos.model_id, count)
        return ReindexReport(count, skipped)

    def _drop_unreadable_photos(self) -> dict[str, list[int]]:
        """Forget the photos whose thumbnails cannot be decoded; their ids by chat."""
        skipped: dict[str, list[int]] = {}
        for scope in self.photos.scopes():
            bad = []
            for photo in self.photos.rows(scope):
                try:
                    decode_image(photo.thumbnail, self.limits)
                except ImageError as error:
                    log.warning(
                        "reindex: chat %s photo %d unreadable (%s); forgotten",
                        scope,
                        photo.photo_id,
                        error,
                    )
                    bad.append(photo.photo_id)
            if bad:
                self.photos.delete_photos(scope, bad)
                skipped[scope] = bad
        return skipped

    def search(
        self,
        scope: str,
        text: str = "",
        ref_image: bytes | None = None,
        k: int = 10,
        text_weight: float | None = None,
    ) -> list[PhotoHit]:
        """Composed image search over the scope's photos: text, a reference photo, both
        (reference changed by the text), and names of remembered concepts in the text, which
        bring in those concepts' examples: composed from CLIP embeddings (:mod:`engine.composition`:
        names replaced by their categories on the text side, late fusion or the weighted sum
        per the ``search_fusion`` setting; ``text_weight`` overrides ``search_text_weight``)
        or encoded by the CIR-LVLM encoder (:mod:`engine.cir.search`). Returns
        :class:`engine.types.PhotoHit` (photo_id, score, source), best first."""
        scope = clean_scope(scope)
        text = clean_description(text or "", MAX_QUESTION_LENGTH)
        if not text and ref_image is None:
            raise InvalidInputError("Tell me what to look for, or reply to a photo.")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
            raise InvalidInputError("The number of results must be between 1 and 100.")
        timer = StageTimer()
        if self.settings.search_encoder == "cir-lvlm":
            return self._search_cir(scope, text, ref_image, k, timer)
        from engine.composition import search_photos

        query = self.compose_query(scope, text, ref_image, timer)
        weight = self.settings.search_text_weight if text_weight is None else text_weight
        with timer.stage("search"):
            return search_photos(
                self.photos,
                scope,
                query,
                k,
                fusion=self.settings.search_fusion,
                text_weight=weight,
                candidates=self.settings.search_candidates,
            )

    def compose_query(self, scope: str, text: str, ref_image: bytes | None = None, timer=None):
        """The CLIP parts of a search (:class:`engine.composition.ComposedQuery`): the reference
        photo, each concept the text names (its examples' mean) and the text with those names
        replaced by their categories ("Mochi on the sofa" -> "a cat on the sofa")."""
        from engine.composition import ComposedQuery, concept_vectors, replace_names

        timer = timer or StageTimer()
        embedder = self.models.embedder
        ref = None
        if ref_image is not None:
            picture = self._decode(ref_image, timer)
            with timer.stage("embed"):
                ref = embedder.embed_images([picture])[0]
        named = named_concepts(self.store, scope, text) if text else []
        concepts = concept_vectors(self.store, scope, [c.id for c in named]) if named else []
        words, has_words = replace_names(text, named) if text else ("", False)
        text_vector = None
        if has_words or (words and not concepts):  # names only: their examples say it all
            with timer.stage("embed"):
                text_vector = embedder.embed_texts([words])[0]
        else:
            words = ""
        return ComposedQuery(words, text_vector, ref, tuple(concepts))

    def _search_cir(self, scope: str, text: str, ref_image: bytes | None, k: int, timer):
        """:meth:`search` with the CIR-LVLM encoder (see :mod:`engine.cir.search`)."""
        from engine.cir.search import MAX_CONCEPT_EXAMPLES, cir_query
        from engine.composition import search_parts

        encoder = self.search_encoder
        ref = self._decode(ref_image, timer) if ref_image is not None else None
        concepts = []
        if text:  # the scope's names in the text, without loading the retriever's models
            for concept in named_concepts(self.store, scope, text):
                crops = self.store.example_crops(scope, concept.id, MAX_CONCEPT_EXAMPLES)
                pictures = [decode_image(c, self.limits) for c in crops]
                concepts.append((concept, pictures))
        with timer.stage("embed"):
            parts = cir_query(encoder, text, ref, concepts)
        with timer.stage("search"):
            return search_parts(self.photos, scope, parts, k, self.settings.search_candidates)


@dataclass(frozen=True)
class ReindexReport:
    """What :meth:`Engine.reindex_report` did: photos re-embedded, and the photos left out
    (unreadable thumbnails, now forgotten) by chat."""

    photos: int
    skipped: dict[str, list[int]]


def _whole(answer: Answer) -> Iterator[str | Answer]:
    yield answer.text
    yield answer


def _final(stream: Iterator[str | Answer]) -> Answer:
    """The Answer at the end of a stream (the text pieces before it are dropped)."""
    last = None
    for last in stream:  # noqa: B007 - only the final item is wanted
        pass
    if not isinstance(last, Answer):
        raise RuntimeError("an answer stream ended without its Answer")
    return last


def _clean_question(question: str) -> str:
    cleaned = clean_description(question, MAX_QUESTION_LENGTH)
    if not cleaned:
        raise InvalidInputError("Ask me something, for example: is Mochi here?")
    return cleaned
