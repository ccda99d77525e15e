"""The Telegram application: python-telegram-bot's ``Application`` wired to the command core.

``build_application`` is what tests drive (with a recording request class, no network);
``run_bot`` is ``rapbot serve telegram``: long polling until SIGINT/SIGTERM, then PTB stops
taking updates, waits for the handlers in flight (each bounded by the request timeout), and our
hooks answer the albums still being collected and close the engine gateway.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from telegram import BotCommand, Update
from telegram.error import InvalidToken, TelegramError
from telegram.ext import AIORateLimiter, Application, BaseRateLimiter
from telegram.request import BaseRequest

from bots.core.commands import USAGE, usage
from bots.core.gateway import EngineGateway, make_gateway
from bots.core.limits import Limits
from bots.core.serve import CommandCore
from bots.telegram_adapter.handlers import PLATFORM_NOTES, TELEGRAM_WORDS, TelegramBot
from engine.errors import RapbotError
from engine.images import ImageLimits

if TYPE_CHECKING:
    from rapbot.settings import Settings

log = logging.getLogger(__name__)

TOKEN_VARIABLE = "TELEGRAM_BOT_TOKEN"
BOT_DATA_KEY = "rapbot"
# Updates handled at once across all chats; the core bounds each chat on its own.
CONCURRENT_UPDATES = 32


def build_application(
    token: str,
    gateway: EngineGateway,
    *,
    image_limits: ImageLimits = ImageLimits(),
    limits: Limits | None = None,
    stream_interval: float = 1.0,
    request: BaseRequest | None = None,
    rate_limiter: BaseRateLimiter | None = None,
    album_window_s: float = 1.5,
    timeout_s: float = 120.0,
) -> Application:
    """An Application answering rapbot's commands through ``gateway``.

    ``request`` replaces PTB's HTTP client (tests record calls with it); ``rate_limiter``
    defaults to ``AIORateLimiter``, which keeps to Telegram's flood limits (30 messages/s
    overall, 20 per minute in a group) and retries once when told to wait.
    """
    bot = TelegramBot(
        CommandCore(
            gateway,
            platform_help=PLATFORM_NOTES,
            photo_words=TELEGRAM_WORDS,
            limits=limits,
            stream_interval=stream_interval,
            time_limit_s=timeout_s,
        ),
        image_limits=image_limits,
        album_window_s=album_window_s,
    )

    async def post_init(app: Application) -> None:
        # The command menu users see when they type '/'; best effort.
        commands = [BotCommand(name, _menu_text(usage(name, TELEGRAM_WORDS))) for name in USAGE]
        try:
            await app.bot.set_my_commands(commands)
        except TelegramError as error:
            log.warning("could not set the command menu: %s", error)
        log.info("Telegram bot @%s is running", app.bot.username)

    async def post_stop(app: Application) -> None:
        # Albums still in their collection window are answered now; indexing gets a moment.
        await bot.close()

    async def post_shutdown(app: Application) -> None:
        await gateway.close()

    builder = (
        Application.builder()
        .token(token)
        .rate_limiter(rate_limiter or AIORateLimiter(max_retries=1))
        .concurrent_updates(CONCURRENT_UPDATES)
        .post_init(post_init)
        .post_stop(post_stop)
        .post_shutdown(post_shutdown)
    )
    if request is not None:
        builder = builder.request(request).get_updates_request(request)
    app = builder.build()
    app.bot_data[BOT_DATA_KEY] = bot
    app.add_handlers(bot.handlers())
    app.add_error_handler(bot.on_error)
    return app


def rapbot_of(app: Application) -> TelegramBot:
    """The rapbot handlers of an application made by :func:`build_application`."""
    return app.bot_data[BOT_DATA_KEY]


def _menu_text(usage: str) -> str:
    """A USAGE line as a menu description (Telegram allows 3–256 characters)."""
    _, _, about = usage.partition(" — ")
    if not about:  # "/rename OLD NAME | NEW NAME" -> "OLD NAME | NEW NAME"
        about = usage.split(" ", 1)[-1]
    return about[:256]


def run_bot(settings: Settings, gateway_kind: str = "local") -> int:
    """``rapbot serve telegram``: poll Telegram until SIGINT/SIGTERM. Returns the exit code."""
    token = settings.telegram_bot_token.get_secret_value().strip()
    if not token:
        raise RapbotError(
            f"{TOKEN_VARIABLE} is not set: create a bot with @BotFather and export its token."
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    library = logging.getLogger("telegram")
    if library.getEffectiveLevel() < logging.INFO:  # privacy: its DEBUG lines quote every
        library.setLevel(logging.INFO)  # Bot API call: users' texts, captions, file names
    gateway = make_gateway(gateway_kind, settings, worker_settings=settings)  # models load here
    app = build_application(
        token,
        gateway,
        image_limits=ImageLimits.from_settings(settings),
        limits=Limits.from_settings(settings),
        stream_interval=settings.stream_interval_s,
    )
    try:
        # PTB installs the SIGINT/SIGTERM handlers and runs post_stop / post_shutdown after them.
        app.run_polling(allowed_updates=[Update.MESSAGE], bootstrap_retries=3)
    except InvalidToken:
        raise RapbotError(f"Telegram refused the token in {TOKEN_VARIABLE}.") from None
    except TelegramError as error:
        raise RapbotError(f"Can't reach Telegram: {error}") from None
    return 0
