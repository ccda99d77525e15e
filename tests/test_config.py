"""The one configuration model (rapbot.settings): sources, validation messages, the README table,
and `rapbot doctor` / `rapbot config` on real settings."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from engine.settings import EngineSettings
from rapbot.cli import main
from rapbot.doctor import diagnose, exit_code
from rapbot.settings import (
    ConfigError,
    Settings,
    WorkerSettings,
    known_variables,
    load_settings,
    settings_table,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No RAPBOT_* or token variables, and a working folder without a .env file."""
    for key in list(os.environ):
        if key.startswith("RAPBOT_") or key.endswith("_BOT_TOKEN"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_one_model_serves_every_part(clean_env):
    settings = load_settings(profile="tiny")
    assert isinstance(settings, Settings)
    assert isinstance(settings, EngineSettings) and isinstance(settings, WorkerSettings)
    assert settings.profile == "tiny" and settings.gateway == "local"
    assert settings.broker_url.startswith("redis://")


def test_environment_file_and_overrides_in_that_order(clean_env, tmp_path):
    config = tmp_path / "rapbot.env"
    config.write_text("RAPBOT_PROFILE=gpu\nRAPBOT_METRICS_PORT=9100\nDISCORD_BOT_TOKEN=abc\n")
    settings = load_settings(config)
    assert (settings.profile, settings.metrics_port) == ("gpu", 9100)
    assert settings.discord_bot_token.get_secret_value() == "abc"
    clean_env.setenv("RAPBOT_PROFILE", "cpu")  # the environment wins over the file
    assert load_settings(config).profile == "cpu"
    assert load_settings(config, profile="tiny").profile == "tiny"  # flags win over both
    clean_env.setenv("RAPBOT_CONFIG_FILE", str(config))  # the file named by the environment
    assert load_settings().metrics_port == 9100


def test_invalid_values_name_the_variable_and_the_value(clean_env):
    clean_env.setenv("RAPBOT_PROFILE", "huge")
    clean_env.setenv("RAPBOT_METRICS_PORT", "-1")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()
    assert "RAPBOT_PROFILE='huge': Input should be 'tiny', 'cpu' or 'gpu'" in lines
    assert "RAPBOT_METRICS_PORT='-1': Input should be greater than or equal to 0" in lines


def test_checks_across_settings_are_reported(clean_env):
    clean_env.setenv("RAPBOT_TASK_TIME_LIMIT_S", "10")  # below the soft limit's default 20
    with pytest.raises(ConfigError, match=r"^RAPBOT_TASK_SOFT_TIME_LIMIT_S must be below"):
        load_settings()


def test_unknown_variables_are_errors_with_a_suggestion(clean_env, tmp_path):
    clean_env.setenv("RAPBOT_PROFLE", "gpu")
    with pytest.raises(
        ConfigError, match=r"RAPBOT_PROFLE: unknown setting \(did you mean RAPBOT_PROFILE\?\)"
    ):
        load_settings()
    clean_env.delenv("RAPBOT_PROFLE")
    config = tmp_path / "bad.env"
    config.write_text("RAPBOT_BROKER=redis://x\n")
    with pytest.raises(ConfigError, match=r"RAPBOT_BROKER \(in .*bad.env\): unknown setting"):
        load_settings(config)
    with pytest.raises(ConfigError, match=r"RAPBOT_CONFIG_FILE='.*missing.env': no such file"):
        load_settings(tmp_path / "missing.env")
    clean_env.setenv("RAPBOT_TEST_CRASH_SHA256", "x")  # test hooks and RAPBOT_USER are not settings
    clean_env.setenv("RAPBOT_USER", "me")
    assert load_settings().profile == "cpu"


def test_tokens_are_never_shown(clean_env, capsys):
    clean_env.setenv("TELEGRAM_BOT_TOKEN", "123456:secret-token-value")
    clean_env.setenv("RAPBOT_PROFILE", "nope")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "secret" not in str(caught.value)
    clean_env.setenv("RAPBOT_PROFILE", "tiny")
    clean_env.setenv("RAPBOT_BROKER_URL", "redis://:hunter2@redis:6379/0")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "TELEGRAM_BOT_TOKEN=**********" in out and "secret" not in out
    assert "RAPBOT_BROKER_URL=redis://:***@redis:6379/0" in out and "hunter2" not in out
    assert "RAPBOT_PROFILE=tiny" in out


def test_cli_reports_a_bad_configuration_in_one_place(clean_env, capsys):
    clean_env.setenv("RAPBOT_LOG_FORMAT", "xml")
    assert main(["concepts"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rapbot: RAPBOT_LOG_FORMAT='xml': Input should be 'text' or 'json'")


def test_readme_documents_every_setting():
    readme = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        v for v in sorted(known_variables()) if v.startswith("RAPBOT_") and f"`{v}`" not in readme
    ]
    # Aliases (RAPBOT_TELEGRAM_BOT_TOKEN ...) are documented under their first name.
    missing = [v for v in missing if not v.endswith("_BOT_TOKEN")]
    assert not missing, f"docs/configuration.md lacks: {missing} (paste `rapbot config --table`)"
    assert settings_table().strip() in readme, (
        "the docs/configuration.md table is out of date: `rapbot config --table`"
    )


def test_doctor_local_mode_all_good(clean_env, tmp_path, capsys):
    code = main(["doctor", "--profile", "tiny", "--data-dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^ok   models: profile tiny: embedder open_clip:", out, re.M)
    assert "FAISS: no memories yet" in out and out.rstrip().endswith("all good")


def test_doctor_names_what_is_down_and_how_to_fix_it(clean_env, tmp_path, capsys):
    clean_env.setenv("RAPBOT_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    clean_env.setenv("TELEGRAM_BOT_TOKEN", "not a token")
    settings = load_settings(profile="tiny", data_dir=tmp_path, gateway="celery")
    checks = {c.name: c for c in diagnose(settings)}
    assert checks["broker"].ok is False and "RAPBOT_BROKER_URL" in checks["broker"].detail
    assert "start Redis" in checks["broker"].fix
    assert checks["workers"].ok is None and checks["models"].ok is None  # a bot loads no models
    assert checks["telegram token"].ok is False and checks["discord token"].ok is None
    assert exit_code(list(checks.values())) == 1
    assert main(["doctor", "--json", "--role", "bot"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False
    assert {c["name"] for c in payload["checks"] if c["ok"] is False} == {
        "broker",
        "telegram token",
    }


def test_doctor_reports_an_unreachable_qdrant(clean_env, tmp_path):
    settings = load_settings(
        profile="tiny", data_dir=tmp_path, store="qdrant", qdrant_url="http://127.0.0.1:1"
    )
    store = {c.name: c for c in diagnose(settings, models=False)}["store"]
    assert store.ok is False and "Qdrant at http://127.0.0.1:1 is not answering" in store.detail


def test_doctor_catches_a_store_of_another_model(clean_env, tmp_path):
    from engine.store import open_store

    open_store(tmp_path / "store", "open_clip:ViT-L-14:openai", 768).close()
    checks = {c.name: c for c in diagnose(load_settings(profile="tiny", data_dir=tmp_path))}
    assert (
        checks["store"].ok is True and "model open_clip:ViT-L-14:openai" in checks["store"].detail
    )
    assert checks["models"].ok is False
    assert "the store was built with open_clip:ViT-L-14:openai" in checks["models"].detail


PROXY_PAGE_TOKEN = "123456789:" + "C" * 35


@pytest.fixture
def fake_platforms(monkeypatch):
    """A local HTTP server answering Telegram's getMe and Discord's /users/@me like the real
    APIs: 200 with the bot for the good tokens, 401 otherwise."""
    import http.server
    import threading

    from rapbot import doctor

    good_telegram, good_discord = "123456789:" + "A" * 35, "M" * 24 + ".GhIjKl." + "x" * 27

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == f"/tg/bot{PROXY_PAGE_TOKEN}/getMe":  # a captive portal's answer
                data = b"<html>please log in</html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if self.path == f"/tg/bot{good_telegram}/getMe":
                body = {"ok": True, "result": {"username": "mochi_bot"}}
            elif (
                self.path == "/dc/users/@me"
                and self.headers["Authorization"] == f"Bot {good_discord}"
            ):
                body = {"username": "Mochi"}
            else:
                self.send_response(401)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(doctor, "TELEGRAM_API", f"{base}/tg")
    monkeypatch.setattr(doctor, "DISCORD_API", f"{base}/dc")
    yield good_telegram, good_discord
    server.shutdown()
    server.server_close()


def test_doctor_online_asks_the_platforms_about_the_tokens(clean_env, tmp_path, fake_platforms):
    good_telegram, good_discord = fake_platforms
    clean_env.setenv("TELEGRAM_BOT_TOKEN", good_telegram)
    clean_env.setenv("DISCORD_BOT_TOKEN", good_discord)
    settings = load_settings(profile="tiny", data_dir=tmp_path)
    offline = {c.name: c for c in diagnose(settings, models=False)}
    assert offline["telegram token"].detail.endswith("well formed (--online asks the platform)")
    online = {c.name: c for c in diagnose(settings, models=False, online=True)}
    assert (
        online["telegram token"].detail == "TELEGRAM_BOT_TOKEN is accepted: the bot is @mochi_bot"
    )
    assert online["discord token"].detail == "DISCORD_BOT_TOKEN is accepted: the bot is Mochi"
    # Well-formed tokens the platforms refuse (revoked): named, with what to do.
    clean_env.setenv("TELEGRAM_BOT_TOKEN", "123456789:" + "B" * 35)
    clean_env.setenv("DISCORD_BOT_TOKEN", good_discord[:-1] + "y")
    refused = {
        c.name: c for c in diagnose(load_settings(data_dir=tmp_path), models=False, online=True)
    }
    assert refused["telegram token"].ok is False
    assert refused["telegram token"].detail.startswith("Telegram refuses TELEGRAM_BOT_TOKEN")
    assert (
        refused["discord token"].ok is False
        and "create a new token" in refused["discord token"].fix
    )
    assert "B" * 35 not in refused["telegram token"].detail  # tokens never appear in findings
    # An answer that is not the API's (a proxy page) is a finding, never a traceback.
    clean_env.setenv("TELEGRAM_BOT_TOKEN", PROXY_PAGE_TOKEN)
    odd = {c.name: c for c in diagnose(load_settings(data_dir=tmp_path), models=False, online=True)}
    assert odd["telegram token"].ok is False and odd["telegram token"].detail.startswith(
        "JSONDecodeError"
    )


def test_cir_lvlm_search_encoder_needs_its_model_folder(clean_env):
    """RAPBOT_SEARCH_ENCODER=cir-lvlm without RAPBOT_SEARCH_MODEL is refused at start, in one
    line naming both variables (not at the first search, nor by leaving photos undeletable)."""
    clean_env.setenv("RAPBOT_SEARCH_ENCODER", "cir-lvlm")
    for value in (None, "  "):
        if value is not None:
            clean_env.setenv("RAPBOT_SEARCH_MODEL", value)
        with pytest.raises(ConfigError) as caught:
            load_settings()
        assert str(caught.value) == (
            "RAPBOT_SEARCH_MODEL must name the folder `rapbot train cir` wrote when"
            " RAPBOT_SEARCH_ENCODER=cir-lvlm (or set RAPBOT_SEARCH_ENCODER=clip)"
        )
    with pytest.raises(ValueError, match="RAPBOT_SEARCH_MODEL must name the folder"):
        EngineSettings(search_encoder="cir-lvlm")
    # Set: accepted (whether the folder holds an encoder is checked where it loads).
    clean_env.setenv("RAPBOT_SEARCH_MODEL", "/models/cir")
    assert load_settings().search_model == "/models/cir"
    clean_env.delenv("RAPBOT_SEARCH_ENCODER")
    clean_env.delenv("RAPBOT_SEARCH_MODEL")
    assert EngineSettings().search_encoder == "clip"  # the default needs no folder
