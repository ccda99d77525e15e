"""One configuration model for every rapbot process: engine, workers, bots, observability.

:class:`Settings` is the single pydantic-settings model; its parts keep their own classes so a
module only sees what it uses (:class:`engine.settings.EngineSettings` for the engine,
:class:`WorkerSettings` for Celery), and a ``Settings`` is accepted wherever one
of them is. Sources, highest first: keyword overrides (CLI flags), environment variables
(``RAPBOT_*``; the bot tokens also as ``TELEGRAM_BOT_TOKEN`` / ``DISCORD_BOT_TOKEN``), the
optional configuration file (``--config`` or ``RAPBOT_CONFIG_FILE``: ``KEY=value`` lines, the
format of ``deploy/rapbot.env.example`` and of compose's ``env_file``), then ``./.env``.

:func:`load_settings` validates everything once, at start, and turns every problem into a
:class:`ConfigError` whose message names the variable, the value and what is wrong — an
unknown ``RAPBOT_*`` variable included (a typo would otherwise be silently ignored).

This module imports no torch: the slim bot image loads it too.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import RapbotError
from engine.settings import EngineSettings

PREFIX = "RAPBOT_"
CONFIG_FILE_VARIABLE = "RAPBOT_CONFIG_FILE"
# RAPBOT_* variables that are not settings: the CLI's own default, the config file pointer and
# the fault-injection hooks of the test suite.
NOT_SETTINGS = {CONFIG_FILE_VARIABLE, "RAPBOT_USER"}
NOT_SETTINGS_PREFIXES = ("RAPBOT_TEST_",)


class ConfigError(RapbotError):
    """The configuration is invalid; the message lists every problem, one per line."""


class WorkerSettings(BaseSettings):
    """Distributed mode: broker, result backend, blob store, limits. Bots (the Celery client)
    and workers read the same values, so both agree on queue names, time limits and blobs."""

    model_config = SettingsConfigDict(
        env_prefix="RAPBOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker: redis://... or amqp://..."
    )
    result_backend: str = Field(
        "redis://127.0.0.1:6379/1", description="where task results wait for the bot"
    )
    blob_url: str = Field(
        "redis://127.0.0.1:6379/2",
        description="photo blobs: redis://... or dir:/path (bot and workers on one machine)",
    )
    blob_ttl_s: int = Field(
        900, ge=10, description="how long a photo waits for a worker (covers redeliveries)"
    )

    # Time limits. A GPU recognize takes well under a second; anything near these limits is a
    # stuck forward or a pathological input, not a slow request.
    task_soft_time_limit_s: float = Field(
        20.0, gt=0, description="the task gets an exception it can report"
    )
    task_time_limit_s: float = Field(
        30.0, gt=0, description="the task (threads pool: the worker process) is killed"
    )
    # Redis transport only (RabbitMQ redelivers as soon as a dead worker's connection closes):
    # an unacked message of a worker that died is given to another worker this long after it
    # was delivered. It must exceed the longest a live worker holds a message — the hard time
    # limit (prefetch 1 means a reserved message starts at once) plus a margin for writing the
    # result — or a slow but healthy task would run twice; any longer only delays recovery.
    visibility_timeout_s: float = Field(
        45.0, gt=0, description="Redis broker: redeliver an unacked message after this long"
    )
    restore_interval_s: float = Field(
        5.0, gt=0, description="Redis broker: how often workers look for such messages"
    )
    max_redeliveries: int = Field(
        2, ge=0, description="deliveries after the first before a request is given up"
    )
    result_expires_s: int = Field(300, ge=10, description="unread results are dropped after this")

    # Client (bot) side.
    client_timeout_s: float = Field(
        60.0, gt=0, description="a bot gives up waiting (and the task expires) after this"
    )
    publish_retry_s: float = Field(
        3.0, ge=0, description="how long a bot retries sending a task to a broker that is down"
    )
    client_max_waiting: int = Field(
        256, ge=1, description="requests one bot process may have in flight at once"
    )

    gpu_queue: str = Field("gpu", min_length=1, description="model work")
    cpu_queue: str = Field("cpu", min_length=1, description="store-only work")

    worker_ready_file: Path | None = Field(
        None, description="written by a worker once its models are loaded and it consumes"
    )

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> WorkerSettings:
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError("RAPBOT_TASK_SOFT_TIME_LIMIT_S must be below RAPBOT_TASK_TIME_LIMIT_S")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                "RAPBOT_VISIBILITY_TIMEOUT_S must exceed RAPBOT_TASK_TIME_LIMIT_S, or a task "
                "still running on a healthy worker is handed to a second one"
            )
        if self.gpu_queue == self.cpu_queue:
            raise ValueError("RAPBOT_GPU_QUEUE and RAPBOT_CPU_QUEUE must differ")
        return self

    @property
    def delivery_counter_ttl_s(self) -> int:
        """How long a task's delivery count is kept: beyond every redelivery it can get."""
        return int(self.visibility_timeout_s * (self.max_redeliveries + 2) + self.blob_ttl_s)


class BotSettings(BaseSettings):
    """The chat adapters: platform tokens, where the engine runs, fairness limits."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    telegram_bot_token: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices("TELEGRAM_BOT_TOKEN", "RAPBOT_TELEGRAM_BOT_TOKEN"),
        description="Telegram bot token from @BotFather",
    )
    discord_bot_token: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices("DISCORD_BOT_TOKEN", "RAPBOT_DISCORD_BOT_TOKEN"),
        description="Discord bot token",
    )
    gateway: Literal["local", "celery"] = Field(
        "local", description="bots: engine in-process (local) or on Celery workers (celery)"
    )
    user_per_minute: float = Field(12.0, gt=0, description="requests per user per minute")
    user_burst: int = Field(5, ge=1, description="requests a user may send at once")
    chat_per_minute: float = Field(40.0, gt=0, description="requests per chat per minute")
    chat_burst: int = Field(15, ge=1, description="requests a chat may send at once")
    in_flight_per_chat: int = Field(4, ge=1, description="requests of one chat being worked on")
    stream_interval_s: float = Field(
        1.0, ge=0.2, description="seconds between edits of a streamed answer (platform limits)"
    )


class ObservabilitySettings(BaseSettings):
    """Logs and metrics of any process."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="text for people, json (one object per line) for log collectors"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="serve Prometheus metrics on this port (0: off)"
    )
    metrics_addr: str = Field("0.0.0.0", description="address the metrics server listens on")


# pydantic orders fields from the last base to the first: engine settings come first in
# error lists and `rapbot config`, as in the tables of docs/configuration.md.
class Settings(ObservabilitySettings, BotSettings, WorkerSettings, EngineSettings):
    """Everything, validated together (see the module notes)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )


def variable_of(field_name: str) -> str:
    """The environment variable that sets a field (the first alias for aliased fields)."""
    field = Settings.model_fields[field_name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return PREFIX + field_name.upper()


def known_variables() -> dict[str, str]:
    """Every accepted variable name -> its field name."""
    names: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        names[PREFIX + name.upper()] = name
        if isinstance(field.validation_alias, AliasChoices):
            for choice in field.validation_alias.choices:
                names[str(choice).upper()] = name
    return names


def _unknown(keys: Iterable[str], where: str) -> list[str]:
    known = known_variables()
    problems = []
    for key in keys:
        upper = key.upper()
        if not upper.startswith(PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        if upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, list(known), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{key}{where}: unknown setting{hint}")
    return problems


def _described(error: ValidationError, given: Mapping[str, Any]) -> list[str]:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across fields: its message names the variables
            lines.append(message)
            continue
        field = str(item["loc"][0])
        variable = variable_of(field) if field in Settings.model_fields else field
        value = item.get("input")
        shown = "" if field.endswith("token") or isinstance(value, dict) else f"={value!r}"
        source = " (command line)" if field in given else ""
        lines.append(f"{variable}{shown}{source}: {message}")
    return lines


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """The validated settings, or a :class:`ConfigError` listing every problem.

    ``config_file`` (default: ``RAPBOT_CONFIG_FILE``) is a ``KEY=value`` file below the
    environment in priority; ``overrides`` (CLI flags) win over both."""
    path_text = str(config_file) if config_file else os.environ.get(CONFIG_FILE_VARIABLE, "")
    problems = _unknown(os.environ, "")
    env_files: list[Path] = [Path(".env")]
    if path_text:
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_FILE_VARIABLE}={path_text!r}: no such file")
        try:
            keys = dotenv_values(path)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path_text}: can't read it ({error})") from None
        problems += _unknown(keys, f" (in {path_text})")
        env_files.append(path)  # later files win over earlier ones
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return Settings(_env_file=tuple(env_files), **overrides)
    except ValidationError as error:
        raise ConfigError("\n".join(_described(error, overrides))) from None


GROUPS: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("Engine", EngineSettings),
    ("Workers and the Celery client", WorkerSettings),
    ("Bots", BotSettings),
    ("Logs and metrics", ObservabilitySettings),
)


def _default_text(field) -> str:
    if field.default_factory is not None:
        return "see text"
    if isinstance(field.default, SecretStr) or field.default in ("", None):
        return "(empty)"
    return f"`{field.default}`"


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part hidden (for output and logs)."""
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def field_names() -> list[str]:
    """Every field, in the order of :data:`GROUPS` (engine first)."""
    return [name for _, group in GROUPS for name in group.model_fields]


def settings_table() -> str:
    """The configuration tables of docs/configuration.md (Markdown), from the model itself."""
    lines: list[str] = []
    for title, group in GROUPS:
        lines += ["", f"**{title}**", "", "| Variable | Default | What it sets |", "|---|---|---|"]
        for name, field in group.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{variable_of(name)}` | {_default_text(field)} | {description} |")
    return "\n".join(lines).strip() + "\n"


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py opens from a URL


def is_redis_url(url: str, *, sentinel: bool = True) -> bool:
    """Whether ``url`` points at Redis: ``redis://``, ``rediss://``, ``unix://`` and, unless
    ``sentinel=False``, ``sentinel://`` (kombu's Sentinel transport). ``sentinel=False`` is for
    callers that open the URL with redis-py itself (``redis.Redis.from_url``), which cannot
    open a Sentinel URL."""
    return url.startswith(_REDIS_SCHEMES + (("sentinel://",) if sentinel else ()))
