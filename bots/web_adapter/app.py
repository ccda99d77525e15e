"""The web chat's FastAPI app: the page, one streamed request per chat message, the gallery.

One person's chat (scope ``web:<name>``) on their own machine: the server listens on
127.0.0.1 only, and that user is the chat's admin (it is their data), as in the terminal chat.
Every message goes through the same :class:`~bots.core.serve.CommandCore` as Telegram and
Discord (admission, rate limits, permissions, replies); the gallery's buttons send ordinary
commands (``/rename A | B``...) for the same reason.

``POST /api/message`` answers with NDJSON events: ``working`` (every second, with the seconds
so far), ``partial`` (a growing answer) and one final ``reply``. Requests must carry the
page's ``X-Rapbot-Token`` header and a local ``Host``: another web site open in the same
browser can neither post commands (a cross-site form cannot set the header) nor reach the
server through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from bots.core import commands as c
from bots.core.messages import Reply
from bots.core.replies import help_text
from bots.core.request import BasePort, ChatRequest, Sender
from bots.core.serve import INTERNAL_ERROR, CommandCore
from bots.web_adapter.files import (
    USER_PREFIX,
    PhotoFolder,
    check_chat_name,
    data_url,
    read_upload,
    source_of,
)
from bots.web_adapter.format import reply_event
from engine.errors import RapbotError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
WEB_WORDS = c.PhotoWords(
    attach="with a photo dropped or pasted in (or one from the chat clicked)",
    short="drop or paste one",
    reference="with a photo dropped or pasted in",
    missing=(
        "This command needs a photo: drop or paste one (or pick one with the camera button),"
        " or click a photo in the chat, then send the command with it."
    ),
)
WEB_HELP = (
    "In this web chat: drop or paste a photo (or pick one with the camera button) and type"
    " the command with it; a plain message is a question (/ask). Click a photo in the chat to"
    " use it again."
)
TIME_LIMIT_S = 300.0  # per request; the first one may load the models
_MESSAGE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
FORM_OVERHEAD = 64 * 1024  # bytes of a message request besides the photo


def web_core(gateway, **options) -> CommandCore:
    """The command core as the web chat uses it: its help, its words for photos and its time
    limit (``options``: limits, stream_interval...)."""
    options.setdefault("time_limit_s", TIME_LIMIT_S)
    return CommandCore(gateway, platform_help=WEB_HELP, photo_words=WEB_WORDS, **options)


@dataclass(frozen=True)
class WebChat:
    """Who is chatting, and the limits that apply."""

    name: str  # the chat's scope is web:<name>, its one user web:<name>
    photos_dir: Path  # indexed photos kept for search results
    limits: ImageLimits = ImageLimits()
    heartbeat_s: float = 1.0  # seconds between "working" events

    def __post_init__(self) -> None:
        check_chat_name(self.name)

    @property
    def scope(self) -> str:
        return f"{USER_PREFIX}{self.name}"

    @property
    def user(self) -> str:
        return f"{USER_PREFIX}{self.name}"


def create_app(core: CommandCore, chat: WebChat, token: str | None = None) -> FastAPI:
    token = token or secrets.token_urlsafe(24)
    photos = PhotoFolder(chat.photos_dir)
    app = FastAPI(title="rapbot web chat", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
    app.state.token = token

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/api/"):
            if not secrets.compare_digest(request.headers.get("x-rapbot-token", ""), token):
                return JSONResponse({"error": "Reload the page (stale or missing token)."}, 403)
            declared = int(request.headers.get("content-length") or 0)
            if declared > chat.limits.max_bytes + FORM_OVERHEAD:
                limit = chat.limits.max_bytes // (1024 * 1024)
                return JSONResponse(
                    {"error": f"The upload is too large; the limit is {limit} MB per photo."}, 413
                )
        return await call_next(request)

    @app.get("/")
    async def page() -> Response:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        meta = f'<meta name="rapbot-token" content="{token}">'
        return Response(html.replace("<!--token-->", meta), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/api/session")
    async def session() -> dict:
        # The core's own help: the one /help gives (web_core: the web chat's words).
        help_ = help_text(core.platform_help, core.photo_words)
        return {"scope": chat.scope, "user": chat.user, "help": help_}

    @app.post("/api/message")
    async def message(
        text: str = Form("", max_length=4000),
        message_id: str = Form(""),
        photo: UploadFile | None = None,
    ) -> StreamingResponse:
        return StreamingResponse(
            _ndjson(_events(core, chat, photos, text, message_id, photo)),
            media_type="application/x-ndjson",
        )

    @app.get("/api/concepts")
    async def concepts() -> dict:
        """The gallery: every concept with its first example crop (inline)."""
        listed = await core.gateway.list_concepts(chat.scope)
        cards = []
        for concept in listed:
            crops = await core.gateway.example_crops(chat.scope, concept.name, 1)
            cards.append(
                {
                    "name": concept.name,
                    "description": concept.description,
                    "examples": concept.examples,
                    "owner": concept.owner,
                    "crop": data_url(crops[0]) if crops else None,
                }
            )
        return {"concepts": cards}

    @app.get("/api/concepts/{name}/examples")
    async def examples(name: str) -> dict:
        try:
            crops = await core.gateway.example_crops(chat.scope, name)
        except RapbotError as error:
            raise HTTPException(404, str(error)) from None
        return {"name": name, "crops": [data_url(crop) for crop in crops]}

    return app


async def _ndjson(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    async for event in events:
        yield (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")


class WebPort(BasePort):
    """The core's port for one web request: replies and growing answers go to the page's
    event stream; photos are the uploaded bytes (checked before the request is made)."""

    def __init__(self, events: asyncio.Queue[dict]) -> None:
        self.events = events

    async def send(self, reply: Reply) -> None:
        await self.events.put({"event": "reply", "reply": reply})

    async def show_partial(self, text: str) -> None:
        await self.events.put({"event": "partial", "text": text})


async def _events(
    core: CommandCore,
    chat: WebChat,
    photos: PhotoFolder,
    text: str,
    message_id: str,
    upload: UploadFile | None,
) -> AsyncIterator[dict]:
    """One chat message: the upload's checks, the posted photo's indexing, the command."""
    text = text.strip()
    photo, photo_error = None, None
    if upload is not None and (upload.filename or upload.size):
        try:
            photo = await read_upload(upload, chat.limits)
        except RapbotError as error:  # said by the core when the command wants a photo
            photo_error = error
        finally:
            await upload.close()
    if not text:
        if photo is None:
            error = str(photo_error) if photo_error else "Type a message or add a photo."
            yield {"event": "reply", "text": error, "error": True}
            return
        await _index(core, chat, photos, photo)
        note = "Photo posted: type a command or a question with it, or click it to use it again."
        yield {"event": "reply", "text": note, "error": False}
        return
    if photo is not None:  # a photo posted with a command is part of the chat, too
        await _index(core, chat, photos, photo)
    request = ChatRequest(
        chat.scope,
        Sender(chat.user, chat.name),
        text if c.is_command(text) else f"/ask {text}",  # plain messages are questions
        photos=(photo,) if photo is not None else (),
        photo_error=photo_error,
        is_admin=True,  # the user's own chat on their own machine
        message_id=message_id if _MESSAGE_ID.fullmatch(message_id) else str(uuid.uuid4()),
    )
    async for event in _served(core, chat, request):
        if isinstance(reply := event.get("reply"), Reply):
            if not reply.error:
                _after(request.command, photos)
            event = reply_event(reply, photos, chat.limits)
        yield event


async def _index(core: CommandCore, chat: WebChat, photos: PhotoFolder, photo: bytes) -> None:
    source = source_of(photo)
    if await core.index_photo(chat.scope, chat.user, photo, source=source) is not None:
        photos.keep(source, photo)


async def _served(core: CommandCore, chat: WebChat, request: ChatRequest):
    """``core.serve``'s events, with a ``working`` heartbeat every second until the reply."""
    events: asyncio.Queue[dict] = asyncio.Queue()
    started = time.monotonic()
    task = asyncio.create_task(core.serve(request, WebPort(events)))
    yield {"event": "working", "seconds": 0}
    try:
        while not (task.done() and events.empty()):
            try:
                event = await asyncio.wait_for(events.get(), chat.heartbeat_s)
            except TimeoutError:
                if task.done() and task.exception() is not None:
                    log.error("web request failed scope=%s", chat.scope, exc_info=task.exception())
                    yield {"event": "reply", "reply": Reply(INTERNAL_ERROR, error=True)}
                    return
                yield {"event": "working", "seconds": round(time.monotonic() - started)}
                continue
            yield event
            if "reply" in event:
                return
    finally:
        task.cancel()  # the page went away: stop the work


def _after(command_text: str, photos: PhotoFolder) -> None:
    """Keep the photo folder in step with the index: /index off and /forget_me remove both."""
    try:
        command = c.parse_command(command_text)
    except RapbotError:
        return
    if isinstance(command, c.ForgetMe) or (isinstance(command, c.Index) and not command.enabled):
        photos.clear()


def run_web(core: CommandCore, chat: WebChat, port: int, open_browser: bool = True) -> None:
    """Serve the chat on 127.0.0.1:``port`` until Ctrl-C."""
    import uvicorn

    app = create_app(core, chat)
    url = f"http://127.0.0.1:{port}/"
    print(f"rapbot web chat for '{chat.scope}' on {url} (Ctrl-C stops it)", flush=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, (url,)).start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
