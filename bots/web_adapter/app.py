"""The web chat's FastAPI app: the page, one streamed request per chat message, the gallery.

One person's chat (scope ``web:<name>``) on their own machine: the server listens on
127.0.0.1 only, and that user is the chat's admin (it is their data), as in the terminal chat.
Every message goes through the same :class:`~bots.core.handler.CommandCore` as Telegram and
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
from bots.core.handler import INTERNAL_ERROR, CommandCore
from bots.core.messages import IncomingMessage, Reply
from bots.core.replies import help_text
from bots.web_adapter.files import PhotoFolder, data_url, read_upload, source_of
from bots.web_adapter.format import reply_event
from engine.errors import RapbotError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
WEB_HELP = (
    "In this web chat: drop or paste a photo (or pick one with 📎) and type the command with it;"
    " a plain message is a question (/ask). Click a photo in the chat to use it again."
)
TIMEOUT_TEXT = "That took too long, sorry. Please try again in a minute."
_MESSAGE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FORM_OVERHEAD = 64 * 1024  # bytes of a message request besides the photo


@dataclass(frozen=True)
class WebChat:
    """Who is chatting, and the limits that apply."""

    name: str  # the chat's scope is web:<name>, its one user web:<name>
    photos_dir: Path  # indexed photos kept for search results
    limits: ImageLimits = ImageLimits()
    timeout_s: float = 300.0  # the first request may load the models
    heartbeat_s: float = 1.0

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise RapbotError(
                "A web chat name is 1 to 64 letters, digits, '.', '_' or '-' (e.g. --name ada)."
            )

    @property
    def scope(self) -> str:
        return f"web:{self.name}"

    @property
    def user(self) -> str:
        return f"web:{self.name}"


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
        return {"scope": chat.scope, "user": chat.user, "help": help_text(WEB_HELP)}

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


async def _events(
    core: CommandCore,
    chat: WebChat,
    photos: PhotoFolder,
    text: str,
    message_id: str,
    upload: UploadFile | None,
) -> AsyncIterator[dict]:
    """One chat message: admission, the upload's checks, the command, its reply."""
    text = text.strip()
    if upload is not None and not upload.filename and not upload.size:
        upload = None  # an empty file field: no photo
    if not text and upload is None:
        yield {"event": "reply", "text": "Type a message or add a photo.", "error": True}
        return
    command_text = text if not text or c.is_command(text) else f"/ask {text}"
    if command_text and (refusal := core.admit(chat.scope, chat.user, command_text)):
        yield reply_event(refusal, photos, chat.limits)
        return
    photo = None
    if upload is not None:
        started = time.perf_counter()
        try:
            photo = await read_upload(upload, chat.limits)
        except RapbotError as error:
            if command_text:
                core.observe_unhandled(command_text, "user_error", time.perf_counter() - started)
            yield {"event": "reply", "text": str(error), "error": True}
            return
        finally:
            await upload.close()
        posted = IncomingMessage(chat.scope, chat.user, "", image=photo)
        source = source_of(photo)
        if await core.index_photo(posted, source) is not None:
            photos.keep(source, photo)
    if not command_text:
        note = "Photo posted: type a command or a question with it, or click it to use it later."
        yield {"event": "reply", "text": note, "error": False}
        return
    incoming = IncomingMessage(
        scope=chat.scope,
        user_id=chat.user,
        text=command_text,
        image=photo,
        is_admin=True,  # the user's own chat on their own machine
        user_name=chat.name,
        message_id=message_id if _MESSAGE_ID.fullmatch(message_id) else str(uuid.uuid4()),
    )
    async for event in _handled(core, chat, incoming):
        if isinstance(reply := event.get("reply"), Reply):
            if not reply.error:
                _after(command_text, photos)
            event = reply_event(reply, photos, chat.limits)
        yield event


async def _handled(core: CommandCore, chat: WebChat, message: IncomingMessage):
    """Run the command, with ``working`` heartbeats and ``partial`` answers while it runs."""
    partials: asyncio.Queue[str] = asyncio.Queue()

    async def on_partial(text: str) -> None:
        await partials.put(text)

    started = time.monotonic()
    task = asyncio.create_task(
        asyncio.wait_for(core.handle(message, admitted=True, on_partial=on_partial), chat.timeout_s)
    )
    yield {"event": "working", "seconds": 0}
    try:
        while not task.done():
            getter = asyncio.ensure_future(partials.get())
            done, _ = await asyncio.wait(
                {task, getter}, timeout=chat.heartbeat_s, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                yield {"event": "partial", "text": getter.result()}
            else:
                getter.cancel()
                if task not in done:
                    yield {"event": "working", "seconds": round(time.monotonic() - started)}
        while not partials.empty():
            partials.get_nowait()  # the final reply carries the whole answer
        try:
            reply: Reply | None = task.result()
        except TimeoutError:
            reply = Reply(TIMEOUT_TEXT, error=True)
        except Exception:  # handle() answers every error itself; this is a bug
            log.exception("web request failed scope=%s", chat.scope)
            reply = Reply(INTERNAL_ERROR, error=True)
        if reply is not None:
            yield {"event": "reply", "reply": reply}
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
