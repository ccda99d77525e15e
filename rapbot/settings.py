"""One configuration model for every rapbot process: engine, workers, bots, observability.

:class:`Settings` is the single pydantic-settings model; its parts keep their own classes so a
module only sees what it uses (:class:`engine.settings.EngineSettings` for the engine,
:class:`workers.config.WorkerSettings` for Celery), and a ``Settings`` is accepted wherever one
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
from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import RapbotError
from engine.settings import EngineSettings
from workers.config import WorkerSettings

PREFIX = "RAPBOT_"
CONFIG_FILE_VARIABLE = "RAPBOT_CONFIG_FILE"
# RAPBOT_* variables that are not settings: the CLI's own default, the config file pointer and
# the fault-injection hooks of the test suite.
NOT_SETTINGS = {CONFIG_FILE_VARIABLE, "RAPBOT_USER"}
NOT_SETTINGS_PREFIXES = ("RAPBOT_TEST_",)


class ConfigError(RapbotError):
    """The configuration is invalid; the message lists every problem, one per line."""


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
