"""``rapbot doctor``: check the configuration, the store, the broker, the workers, the models and
the bot tokens, and say what is wrong and how to fix it.

Each check returns a :class:`Check`: ``ok`` (True, False, or None for "skipped / not needed
here") with a one-line detail, and for failures a ``fix``. Checks never raise: an outage is a
finding. What is checked depends on where the doctor runs: a bot with ``RAPBOT_GATEWAY=celery``
needs the broker and live workers but no models; a worker or a local-mode bot needs the store
and the models.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from engine.weights import first_line
from rapbot.settings import ConfigError, Settings, is_redis_url, load_settings, redact_url

# Telegram: "<bot id>:<35 characters>"; Discord: three base64url parts separated by dots.
TELEGRAM_TOKEN = re.compile(r"^\d{5,}:[A-Za-z0-9_-]{30,}$")
DISCORD_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$")
NETWORK_TIMEOUT_S = 3.0
# Where `--online` asks whether a token is accepted (tests point these at a local server).
TELEGRAM_API = "https://api.telegram.org"
DISCORD_API = "https://discord.com/api/v10"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped (not needed in this process's role)
    detail: str
    fix: str = ""


def _run(name: str, probe: Callable[[], Check]) -> Check:
    try:
        return probe()
    except Exception as error:  # noqa: BLE001 - every failure is reported, never raised
        return Check(name, False, f"{type(error).__name__}: {first_line(error)}")


def check_data_dir(settings: Settings) -> Check:
    root = Path(settings.data_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-"):
            pass
    except OSError as error:
        return Check(
            "data folder",
            False,
            f"{root} is not writable ({error.strerror or error})",
            "set RAPBOT_DATA_DIR to a writable folder (a volume in containers)",
        )
    return Check("data folder", True, f"{root} is writable")


def check_store(settings: Settings) -> Check:
    if settings.store == "qdrant" and settings.qdrant_url not in ("", ":memory:"):
        from qdrant_client import QdrantClient

        client = QdrantClient(
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key.get_secret_value() or None,
            https=settings.qdrant_https,
            timeout=int(NETWORK_TIMEOUT_S),
            check_compatibility=False,  # a down server is reported below, not warned about
        )
        try:
            names = [c.name for c in client.get_collections().collections]
        except Exception as error:  # noqa: BLE001
            return Check(
                "store",
                False,
                f"Qdrant at {settings.qdrant_url} is not answering ({first_line(error)})",
                "start Qdrant (docker compose up -d qdrant) or fix RAPBOT_QDRANT_URL /"
                " RAPBOT_QDRANT_API_KEY",
            )
        finally:
            client.close()
        ours = [n for n in names if n.startswith(f"{settings.qdrant_prefix}_")]
        return Check("store", True, f"Qdrant at {settings.qdrant_url}: {len(ours)} collection(s)")

    if settings.store == "qdrant":
        folder = Path(settings.data_dir).expanduser() / "qdrant"
        return Check("store", True, f"Qdrant on disk in {folder} (one process only)")
    from engine.store.faiss_store import read_store_summary  # faiss: engine roles only

    meta = read_store_summary(Path(settings.data_dir).expanduser() / "store")
    if meta is None:
        return Check("store", True, "FAISS: no memories yet (created on the first /remember)")
    return Check(
        "store",
        True,
        f"FAISS in {settings.data_dir}: {meta['chats']} chat(s), {meta['concepts']} concept(s),"
        f" model {meta['model_id']}",
    )


def _redis_ping(url: str) -> None:
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=NETWORK_TIMEOUT_S, socket_connect_timeout=NETWORK_TIMEOUT_S
    )
    try:
        client.ping()
    finally:
        client.close()


def _ping_url(url: str) -> None:
    if is_redis_url(url, sentinel=False):
        _redis_ping(url)
        return
    from kombu import Connection

    with Connection(url, connect_timeout=NETWORK_TIMEOUT_S) as connection:
        connection.ensure_connection(max_retries=1)


def check_broker(settings: Settings) -> Check:
    problems = []
    for variable, url in (
        ("RAPBOT_BROKER_URL", settings.broker_url),
        ("RAPBOT_RESULT_BACKEND", settings.result_backend),
        ("RAPBOT_BLOB_URL", settings.blob_url),
    ):
        if url.startswith("dir:"):
            folder = Path(url[4:]).expanduser()
            if not folder.is_dir():
                problems.append(f"{variable}: folder {folder} does not exist")
            continue
        try:
            _ping_url(url)
        except Exception as error:  # noqa: BLE001
            problems.append(f"{variable} {redact_url(url)}: {first_line(error)}")
    if problems:
        return Check(
            "broker",
            False,
            "; ".join(problems),
            "start Redis (docker compose up -d redis) or fix the URLs",
        )
    return Check("broker", True, f"{redact_url(settings.broker_url)} and the result store answer")


def check_workers(settings: Settings) -> Check:
    from workers.app import create_app

    app = create_app(settings, client=True)
    try:
        replies = app.control.inspect(timeout=NETWORK_TIMEOUT_S).active_queues() or {}
    finally:
        app.close()
    consuming: dict[str, int] = {}
    for queues in replies.values():
        for queue in queues or []:
            consuming[queue["name"]] = consuming.get(queue["name"], 0) + 1
    missing = [q for q in (settings.gpu_queue, settings.cpu_queue) if not consuming.get(q)]
    counts = ", ".join(
        f"{q}: {consuming.get(q, 0)}" for q in (settings.gpu_queue, settings.cpu_queue)
    )
    if missing:
        return Check(
            "workers",
            False,
            f"no worker consumes {', '.join(missing)} (workers per queue: {counts})",
            "start `rapbot worker` (docker compose up -d worker-gpu worker-cpu); a starting"
            " GPU worker answers once its models are loaded",
        )
    return Check("workers", True, f"workers per queue: {counts}")


def check_models(settings: Settings) -> Check:
    from engine.models import load_models

    started = time.perf_counter()
    models = load_models(settings, reuse=False)
    seconds = time.perf_counter() - started
    generator = "none (recognition-only)" if models.generator is None else "loaded"
    from engine.store.faiss_store import read_store_summary

    meta = (
        None
        if settings.store != "faiss"
        else read_store_summary(Path(settings.data_dir).expanduser() / "store")
    )
    if meta is not None and meta["model_id"] != models.embedder.model_id:
        return Check(
            "models",
            False,
            f"the store was built with {meta['model_id']}, the engine now embeds with"
            f" {models.embedder.model_id}: remembered concepts would not be found",
            "use the profile the store was made with, or export/import the chats to re-embed",
        )
    return Check(
        "models",
        True,
        f"profile {models.profile.name}: embedder {models.embedder.model_id} on"
        f" {models.embedder.device}, detector {models.detector.name}, generator {generator}"
        f" ({seconds:.1f} s)",
    )


def check_token(
    name: str,
    variable: str,
    token: str,
    pattern: re.Pattern[str],
    ask: Callable[[str], str] | None = None,
) -> Check:
    """The token's form; with ``ask`` (``--online``) also whether the platform accepts it."""
    if not token:
        return Check(name, None, f"{variable} is not set (needed only to serve {name.split()[0]})")
    if not pattern.match(token):
        return Check(
            name,
            False,
            f"{variable} does not look like a {name} (check for quotes, spaces or a cut copy)",
            f"copy the token again into {variable}",
        )
    if ask is None:
        return Check(name, True, f"{variable} is well formed (--online asks the platform)")
    try:
        who = ask(token)
    except PermissionError:
        return Check(
            name,
            False,
            f"{name.split()[0].title()} refuses {variable} (revoked or from another bot)",
            f"create a new token and put it in {variable}",
        )
    except OSError as error:
        return Check(name, False, f"can't reach {name.split()[0].title()}: {first_line(error)}")
    return Check(name, True, f"{variable} is accepted: the bot is {who}")


def _get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    """GET ``url`` as JSON; PermissionError for 401/403/404 (a token the platform refuses)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, headers={"User-Agent": "rapbot-doctor", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        if error.code in (401, 403, 404):
            raise PermissionError(error.code) from None
        raise


def ask_telegram(token: str) -> str:
    """The bot's @username from Telegram's getMe (the token is in the URL path, never logged)."""
    me = _get_json(f"{TELEGRAM_API}/bot{token}/getMe")
    if not me.get("ok"):
        raise PermissionError(me.get("description", "refused"))
    return "@" + str(me["result"].get("username", "?"))


def ask_discord(token: str) -> str:
    """The bot user's name from Discord's /users/@me."""
    me = _get_json(f"{DISCORD_API}/users/@me", {"Authorization": f"Bot {token}"})
    return str(me.get("username", "?"))


def diagnose(
    settings: Settings | None = None,
    *,
    role: str = "auto",
    models: bool = True,
    online: bool = False,
    config_file: str | None = None,
) -> list[Check]:
    """Every check for a process in ``role`` (auto: from ``RAPBOT_GATEWAY``): ``local`` (engine
    in-process), ``bot`` (a Celery client) or ``worker``."""
    if settings is None:
        try:
            settings = load_settings(config_file)
        except ConfigError as error:
            return [
                Check(
                    "configuration",
                    False,
                    str(error).replace("\n", "; "),
                    "fix the variables named (see docs/configuration.md)",
                )
            ]
    if role == "auto":
        role = "bot" if settings.gateway == "celery" else "local"
    checks = [Check("configuration", True, f"valid (profile {settings.profile}, role {role})")]
    needs_engine = role in ("local", "worker")
    distributed = role in ("bot", "worker")
    checks.append(
        _run("data folder", lambda: check_data_dir(settings))
        if needs_engine
        else Check("data folder", None, "not used by a Celery client")
    )
    checks.append(
        _run("store", lambda: check_store(settings))
        if needs_engine
        else Check("store", None, "used by the workers, not the bot")
    )
    if distributed:
        broker = _run("broker", lambda: check_broker(settings))
        checks.append(broker)
        if broker.ok:
            checks.append(_run("workers", lambda: check_workers(settings)))
        else:
            checks.append(Check("workers", None, "not checked: the broker is down"))
    if needs_engine and models:
        checks.append(_run("models", lambda: check_models(settings)))
    elif needs_engine:
        checks.append(Check("models", None, "skipped (--skip-models)"))
    else:
        checks.append(Check("models", None, "loaded by the workers, not the bot"))
    platforms = (
        (
            "telegram token",
            "TELEGRAM_BOT_TOKEN",
            settings.telegram_bot_token,
            TELEGRAM_TOKEN,
            ask_telegram,
        ),
        (
            "discord token",
            "DISCORD_BOT_TOKEN",
            settings.discord_bot_token,
            DISCORD_TOKEN,
            ask_discord,
        ),
    )
    for name, variable, secret, pattern, ask in platforms:
        token = secret.get_secret_value().strip()
        probe = ask if online else None
        checks.append(_run(name, partial(check_token, name, variable, token, pattern, probe)))
    return checks


def report(checks: list[Check]) -> str:
    marks = {True: "ok  ", False: "FAIL", None: "-   "}
    lines = []
    for check in checks:
        lines.append(f"{marks[check.ok]} {check.name}: {check.detail}")
        if check.ok is False and check.fix:
            lines.append(f"     fix: {check.fix}")
    failed = sum(check.ok is False for check in checks)
    lines.append("all good" if not failed else f"{failed} problem{'s' if failed != 1 else ''}")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict:
    return {"ok": all(c.ok is not False for c in checks), "checks": [asdict(c) for c in checks]}


def exit_code(checks: list[Check]) -> int:
    return 1 if any(check.ok is False for check in checks) else 0
