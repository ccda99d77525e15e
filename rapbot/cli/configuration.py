"""`doctor`, `config`: check the configuration and show the settings in effect."""

from __future__ import annotations

import argparse
import json

from rapbot.cli.common import emit, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "doctor", parents=[common], help="check the configuration, store, broker, models, tokens"
    )
    p.set_defaults(handler=run_doctor)
    p.add_argument(
        "--role",
        choices=["auto", "local", "bot", "worker"],
        default="auto",
        help="what this process is (auto: bot with RAPBOT_GATEWAY=celery, else local)",
    )
    p.add_argument("--skip-models", action="store_true", help="do not load the models")
    p.add_argument(
        "--online", action="store_true", help="ask Telegram / Discord whether the tokens work"
    )

    p = sub.add_parser("config", parents=[common], help="show the settings in effect")
    p.set_defaults(handler=run_config)
    p.add_argument(
        "--table", action="store_true", help="every setting as Markdown tables (the README's)"
    )


def run_doctor(args: argparse.Namespace) -> int:
    """`rapbot doctor`: every check, what is wrong and how to fix it; exit 1 on a problem."""
    from rapbot.doctor import Check, as_json, diagnose, exit_code, report
    from rapbot.settings import ConfigError

    try:
        settings = settings_for(args)
    except ConfigError as error:
        settings = None
        checks = [Check("configuration", False, str(error).replace("\n", "; "))]
    if settings is not None:
        checks = diagnose(settings, role=args.role, models=not args.skip_models, online=args.online)
    emit(args, as_json(checks), report(checks))
    return exit_code(checks)


def run_config(args: argparse.Namespace) -> int:
    """`rapbot config`: the settings in effect (secrets hidden), or the README's tables."""
    from rapbot.settings import field_names, redact_url, settings_table, variable_of

    settings = settings_for(args)
    if args.table:
        print(settings_table(), end="")
        return 0
    values = settings.model_dump(mode="json")  # SecretStr fields dump as "**********"
    values = {k: redact_url(v) if isinstance(v, str) else v for k, v in values.items()}
    if args.json:
        print(json.dumps(values, ensure_ascii=False, indent=2))
    else:
        for name in field_names():
            value = values[name]
            print(f"{variable_of(name)}={'' if value is None else value}")
    return 0
