"""The web chat: its HTTP guards, and the whole page end to end in a real headless Chromium.

The browser test drives Debian's chromium (``apt-get install chromium``; `.ci/run` installs it)
through Playwright with ``executable_path``: Playwright never downloads a browser here. A
missing chromium fails the test, so CI cannot pass without having run it.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bots.core.gateway import LocalGateway
from bots.core.limits import Limits
from bots.core.messages import Reply
from bots.web_adapter import WebChat, create_app, web_core
from bots.web_adapter.files import PhotoFolder, source_of
from bots.web_adapter.format import reply_event
from engine.errors import RapbotError
from engine.images import ImageLimits
from engine.render import PALETTE

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "test-token"
# Set to a folder (docs/img) to keep the screenshots the test takes.
SCREENSHOTS = os.environ.get("WEB_CHAT_SCREENSHOTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, url: str, chat: WebChat) -> None:
        self.url = url
        self.chat = chat


@pytest.fixture
def served(tiny_engine, tmp_path) -> Iterator[Served]:
    """The web chat on the tiny engine, served by uvicorn on a free local port."""
    import uvicorn

    chat = WebChat("ada", tmp_path / "web-photos", ImageLimits(max_bytes=2 * 1024 * 1024))
    gateway = LocalGateway(tiny_engine)
    # The adapters' rate limits apply; this test's user may send a dozen commands at once.
    core = web_core(gateway, limits=Limits(user_burst=20, chat_burst=20))  # as `rapbot web`
    app = create_app(core, chat, token=TOKEN)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the web chat did not start"
        time.sleep(0.05)
    yield Served(f"http://127.0.0.1:{port}", chat)
    server.should_exit = True
    thread.join(10)


# ----------------------------------------------------------------------------- HTTP guards


def test_api_needs_the_page_token_and_a_local_host(served: Served):
    import httpx

    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and 'name="rapbot-token"' in page.text
    assert httpx.get(served.url + "/api/concepts").status_code == 403
    # A cross-site form post carries no token header: nothing runs.
    refused = httpx.post(served.url + "/api/message", data={"text": "/forget_me"})
    assert refused.status_code == 403
    ok = httpx.get(served.url + "/api/concepts", headers={"X-Rapbot-Token": TOKEN})
    assert ok.json() == {"concepts": []}
    # DNS rebinding: a foreign Host name is refused before any route.
    rebound = httpx.get(
        served.url + "/api/concepts", headers={"X-Rapbot-Token": TOKEN, "Host": "evil.example"}
    )
    assert rebound.status_code == 400


def _events(response) -> list[dict]:
    import json

    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_bad_uploads_get_the_same_one_line_messages(served: Served, tmp_path: Path):
    import httpx

    headers = {"X-Rapbot-Token": TOKEN}
    url = served.url + "/api/message"
    text = httpx.post(
        url, headers=headers, data={"text": "/who"}, files={"photo": ("x.jpg", b"hello")}
    )
    reply = _events(text)[-1]
    assert reply["error"] and reply["text"].startswith("This file is not an image I can read")
    empty = httpx.post(url, headers=headers, data={"text": "/who"}, files={"photo": ("e.jpg", b"")})
    assert _events(empty)[-1]["text"] == "The file is empty."
    huge = httpx.post(
        url, headers=headers, data={"text": "/who"}, files={"photo": ("h.jpg", b"\0" * (3 << 20))}
    )
    assert huge.status_code == 413 and "too large" in huge.json()["error"]
    no_photo = _events(httpx.post(url, headers=headers, data={"text": "/who"}))
    assert no_photo[-1]["error"] and "photo" in no_photo[-1]["text"]
    unknown = _events(httpx.post(url, headers=headers, data={"text": "/forget Nobody"}))
    assert unknown[-1]["error"] and "Nobody" in unknown[-1]["text"]


TELEGRAM_GESTURES = ("caption of a photo", "in reply to", "(caption or reply)")


def test_help_and_usage_say_drop_or_paste_a_photo(served: Served):
    """The web chat's own words for giving a command its photo, in the page's help, /help, a
    usage error and the missing-photo reply; none of Telegram's."""
    import httpx

    headers = {"X-Rapbot-Token": TOKEN}
    url = served.url + "/api/message"
    page_help = httpx.get(served.url + "/api/session", headers=headers).json()["help"]
    helped = _events(httpx.post(url, headers=headers, data={"text": "/help"}))[-1]["text"]
    assert helped == page_help
    assert "/remember NAME | description — with a photo dropped or pasted in" in helped
    assert "/ask QUESTION — about a photo (drop or paste one)" in helped
    usage = _events(httpx.post(url, headers=headers, data={"text": "/remember"}))[-1]
    assert usage["error"] and usage["text"].startswith(
        "Usage: /remember NAME | description — with a photo dropped or pasted in"
    )
    no_photo = _events(httpx.post(url, headers=headers, data={"text": "/caption"}))[-1]
    assert no_photo["error"] and no_photo["text"].startswith(
        "This command needs a photo: drop or paste one"
    )
    for text in (helped, usage["text"], no_photo["text"]):
        assert not any(gesture in text for gesture in TELEGRAM_GESTURES), text


def test_a_web_chat_name_cannot_point_outside_its_folder(tmp_path: Path):
    """`rapbot web --user ..` once kept its photos in <data>/web/../photos: the photo store's
    own folder, which /forget_me or /index off then deleted for every chat."""
    from bots.web_adapter.files import photos_dir
    from engine.errors import InvalidInputError

    for name in ("..", ".", "a/b", ""):
        with pytest.raises(InvalidInputError, match="web chat name"):
            WebChat(name, tmp_path / "photos")
        with pytest.raises(InvalidInputError, match="web chat name"):
            photos_dir(tmp_path, name)
    assert photos_dir(tmp_path, "..ada") == tmp_path / "web" / "..ada" / "photos"


def test_search_results_show_only_photos_this_chat_kept(tmp_path: Path):
    folder = PhotoFolder(tmp_path / "photos")
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(photo, format="JPEG")
    kept = source_of(photo.getvalue())
    folder.keep(kept, photo.getvalue())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(photo.getvalue())
    # Sources from an imported archive can be anything: a path, a traversal, a URL.
    refs = (kept, str(secret), "web-photo:../../secret", "web-photo:" + "0" * 64, "http://x/y.jpg")
    event = reply_event(Reply("Found 5", photo_refs=refs), folder, ImageLimits())
    assert event["photos"][0].startswith("data:image/jpeg;base64,")
    assert event["photos"][1:] == [None, None, None, None]
    with pytest.raises(ValueError):
        folder.keep("web-photo:../x", b"")
    folder.clear()
    assert reply_event(Reply("", photo_refs=(kept,)), folder, ImageLimits())["photos"] == [None]


def test_chat_names_are_checked_before_anything_runs(tmp_path: Path):
    with pytest.raises(RapbotError, match="web chat name"):
        WebChat("../ada", tmp_path)


# ----------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _not_blank(png: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert pixels.std() > 10, "the screenshot is blank"
    return pixels


def _has_colour(pixels: np.ndarray, hex_colour: str, at_least: int = 50) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).sum(axis=2) < 40).sum()) >= at_least


def _keep(name: str, png: bytes) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        Path(SCREENSHOTS, name).write_bytes(png)


def test_upload_remember_who_concepts_search_forget_in_a_browser(
    served: Served, chromium, dreambooth: Path
):
    cat = dreambooth / "cat" / "00.jpg"
    page = chromium.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(served.url + "/")
    page.get_by_text("Hello! Add a photo").wait_for()
    assert page.locator("#scope").inner_text() == "web:ada"

    def send(text: str, photo: Path | None = None):
        before = page.locator(".msg.bot").count()
        if photo is not None:
            page.set_input_files("#file", str(photo))
            page.locator("#pending").wait_for(state="visible")
        page.fill("#text", text)
        page.click("#send")
        reply = page.locator(".msg.bot").nth(before)
        page.wait_for_function(
            "n => { const m = document.querySelectorAll('.msg.bot')[n];"
            " return m && !m.classList.contains('working'); }",
            arg=before,
            timeout=120_000,
        )
        return reply

    # Upload + remember: the gallery shows the new concept with its crop.
    reply = send("/remember Mochi | my grey cat", cat)
    assert "Got it: I'll remember Mochi (my grey cat)" in reply.inner_text()
    assert not page.locator("#pending").is_visible()  # the photo was used once
    card = page.locator('.card[data-name="Mochi"]')
    card.wait_for()
    card.locator("img").evaluate("img => img.decode()")
    assert card.locator("img").evaluate("img => img.naturalWidth") > 0

    # Who, with the annotated photo inline and loaded.
    reply = send("/who", cat)
    assert "Mochi" in reply.locator(".text").inner_text()
    annotated = reply.locator("img.annotated")
    annotated.evaluate("img => img.decode()")
    size = annotated.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == list(Image.open(cat).size)
    shot = _not_blank(annotated.screenshot())
    assert _has_colour(shot, PALETTE[0]), "the named box is not in the shown photo"
    whole = page.screenshot()
    _not_blank(whole)
    _keep("web-chat.png", whole)

    # A bad upload: the same one-line message as everywhere, and nothing changes.
    bad = served.chat.photos_dir.parent / "notes.jpg"
    bad.write_bytes(b"not a photo at all")
    reply = send("/remember Rex", bad)
    assert "not an image I can read" in reply.inner_text()
    assert page.locator(".card").count() == 1

    # /concepts: the contact sheet, inline.
    reply = send("/concepts")
    sheet = reply.locator("img.sheet")
    sheet.evaluate("img => img.decode()")
    assert sheet.evaluate("img => img.naturalWidth") > 0
    assert "I remember 1 in this chat" in reply.inner_text()

    # /search: photos posted while /index is on come back as thumbnails.
    send("/index on")
    send("", dreambooth / "dog" / "00.jpg")
    reply = send("/search a dog on the grass")
    thumbs = reply.locator(".results img")
    assert thumbs.count() >= 1
    thumbs.first.evaluate("img => img.decode()")
    assert thumbs.first.evaluate("img => img.naturalWidth") > 0

    # Forget from the gallery (the confirm dialog is accepted).
    reply_count = page.locator(".msg.bot").count()
    card.get_by_role("button", name="forget").click()
    page.wait_for_function(
        "n => { const m = document.querySelectorAll('.msg.bot')[n];"
        " return m && !m.classList.contains('working'); }",
        arg=reply_count,
    )
    assert "I've forgotten Mochi" in page.locator(".msg.bot").nth(reply_count).inner_text()
    page.locator("#gallery-empty").wait_for(state="visible")
    assert page.locator(".card").count() == 0
    assert errors == [], f"JavaScript errors: {errors}"
    page.close()
