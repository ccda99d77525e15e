"""The compose stack, the container images and the example configuration in deploy/.

No Docker daemon is needed: the compose files are read as YAML and checked against what the
services need (healthchecks, restart policies, GPUs, profiles, real `rapbot` commands), the
example configuration is validated by the one settings model, and the slim bot image's promise
(no torch) is checked by running the bots' start-up path with the model libraries blocked.
Every compose file is validated against the Compose Specification's JSON schema (the copy
check-jsonschema ships), and `docker compose config` runs too where the compose plugin is
installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
EXTRA_COMPOSE = sorted(p for p in DEPLOY.glob("compose*.yaml") if p != COMPOSE)
ENV_EXAMPLE = DEPLOY / "rapbot.env.example"
BOT_DOCKERFILE = DEPLOY / "bot.Dockerfile"
WORKER_DOCKERFILE = DEPLOY / "worker.Dockerfile"
BOT_REQUIREMENTS = DEPLOY / "requirements-bot.txt"

REQUIRED_SERVICES = {"redis", "qdrant", "worker-gpu", "worker-cpu", "telegram", "discord"}
BOT_PROFILES = {"telegram": ["telegram"], "discord": ["discord"]}
# Import names the slim bot image must never need, and their distribution names.
HEAVY_MODULES = (
    "torch",
    "torchvision",
    "open_clip",
    "ultralytics",
    "transformers",
    "faiss",
    "qdrant_client",
    "peft",
    "accelerate",
)
HEAVY_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "open-clip-torch",
    "open_clip_torch",
    "ultralytics",
    "transformers",
    "faiss-cpu",
    "faiss-gpu",
    "qdrant-client",
    "peft",
    "accelerate",
    "bitsandbytes",
)
TOKEN_VARIABLES = ("TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN")


# ----------------------------------------------------------------------------- helpers


def load_compose(path: Path = COMPOSE) -> dict:
    data = yaml.safe_load(path.read_text())  # safe_load resolves anchors and `<<` merges
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), path
    return data


def all_services() -> dict[str, tuple[Path, dict]]:
    """Every service of compose.yaml and of the extra compose files used with it."""
    services: dict[str, tuple[Path, dict]] = {}
    for path in [COMPOSE, *EXTRA_COMPOSE]:
        for name, service in load_compose(path)["services"].items():
            services[name] = (path, service)
    return services


def rapbot_services() -> dict[str, tuple[Path, dict]]:
    """Services that run a rapbot image (built from deploy/*.Dockerfile)."""
    return {name: item for name, item in all_services().items() if "build" in item[1]}


def env_file_names(service: dict) -> list[str]:
    entries = service.get("env_file") or []
    if isinstance(entries, str):
        entries = [entries]
    return [entry if isinstance(entry, str) else entry["path"] for entry in entries]


def env_example_keys(text: str | None = None) -> tuple[list[str], list[str]]:
    """(keys set, keys shown in commented-out examples) of the example configuration."""
    text = ENV_EXAMPLE.read_text() if text is None else text
    set_keys = re.findall(r"^([A-Z][A-Z0-9_]*)=", text, flags=re.M)
    commented = re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", text, flags=re.M)
    return set_keys, commented


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: the last instruction ends with a backslash"
    result = []
    for line in lines:
        instruction, _, arguments = line.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def copy_sources(path: Path) -> list[str]:
    sources = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction not in ("COPY", "ADD"):
            continue
        if any(w.startswith("--from") for w in arguments.split()):
            continue  # from another stage, not the build context
        words = [w for w in arguments.split() if not w.startswith("--")]
        sources += words[:-1]  # the last word is the destination
    return sources


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans folders, `*` and `?` stay in one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(relative: str) -> bool:
    """Whether the repository's .dockerignore keeps ``relative`` out of the build context
    (Docker's rules: the last matching pattern wins, `!` re-includes, and a pattern that
    matches a folder matches everything below it)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.is_file():
        return False
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in ignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _dockerignore_regex(line.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower())
    return names


def clean_rapbot_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RAPBOT_") or name in TOKEN_VARIABLES:
            monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- compose


def test_compose_has_the_stack() -> None:
    services = load_compose()["services"]
    assert set(services) >= REQUIRED_SERVICES, sorted(REQUIRED_SERVICES - set(services))
    # The core of the stack starts without a profile; the bots only when asked for.
    for name in ("redis", "qdrant", "worker-gpu", "worker-cpu"):
        assert not services[name].get("profiles"), name
    if "prometheus" in services:  # optional monitoring, never started by default
        assert services["prometheus"]["profiles"] == ["monitoring"]


def test_every_service_has_a_healthcheck_and_a_restart_policy() -> None:
    for name, (path, service) in all_services().items():
        where = f"{path.name}: {name}"
        assert service.get("restart") in ("unless-stopped", "always"), where
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{where} has no healthcheck"
        test = check["test"]
        assert test and (isinstance(test, str) or test[0] in ("CMD", "CMD-SHELL")), where


def test_the_gpu_workers_reserve_nvidia_gpus() -> None:
    gpu_workers = {n: s for n, (_, s) in all_services().items() if n.startswith("worker-gpu")}
    assert "worker-gpu" in gpu_workers
    seen_ids: list[str] = []
    for name, service in gpu_workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert ("count" in device) != ("device_ids" in device), f"{name}: count or device_ids"
        seen_ids += [str(i) for i in device.get("device_ids", [])]
        assert service["command"][-2:] == ["--queues", "gpu"], name
    assert len(seen_ids) == len(set(seen_ids)), f"two GPU workers share a GPU: {seen_ids}"
    # The store-only worker needs no GPU and must not hold one.
    cpu_worker = load_compose()["services"]["worker-cpu"]
    assert "deploy" not in cpu_worker or "devices" not in str(cpu_worker["deploy"])


def test_bots_are_behind_their_profiles() -> None:
    services = load_compose()["services"]
    for name, profiles in BOT_PROFILES.items():
        assert services[name]["profiles"] == profiles, name
        assert services[name]["image"] != services["worker-gpu"]["image"], (
            f"{name} must run on the slim bot image"
        )
        assert services[name]["build"]["dockerfile"] == "deploy/bot.Dockerfile", name


def test_depends_on_waits_for_health() -> None:
    services = all_services()
    for name, (_path, service) in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions (long form)"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if services[dependency][1].get("healthcheck"):
                assert spec.get("condition") == "service_healthy", f"{name} -> {dependency}"
            # A service always started must never wait for one behind a profile.
            if not service.get("profiles"):
                assert not services[dependency][1].get("profiles"), f"{name} -> {dependency}"


def test_builds_point_at_real_dockerfiles() -> None:
    dockerfiles = set()
    for name, (path, service) in rapbot_services().items():
        build = service["build"]
        context = (path.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is the repository root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        dockerfiles.add(dockerfile)
        # One image name per Dockerfile: worker-gpu and worker-cpu share theirs.
        expected = "rapbot-bot:local" if dockerfile == BOT_DOCKERFILE else "rapbot-worker:local"
        assert service["image"] == expected, name
    assert dockerfiles == {BOT_DOCKERFILE, WORKER_DOCKERFILE}


def test_volumes_and_mounted_files_exist() -> None:
    declared = set((load_compose(COMPOSE).get("volumes") or {}).keys())
    for path in [COMPOSE, *EXTRA_COMPOSE]:
        for name, service in load_compose(path)["services"].items():
            for volume in service.get("volumes") or []:
                source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
                if source.startswith((".", "/")):
                    assert (path.parent / source).exists(), f"{name}: {source} is missing"
                else:
                    assert source in declared, f"{name}: volume {source} is not declared"


def test_interpolations_have_defaults_or_are_in_the_example() -> None:
    example_keys = set(env_example_keys()[0])
    for path in [COMPOSE, *EXTRA_COMPOSE]:
        text = re.sub(r"\$\$", "", path.read_text())  # `$$` is a literal dollar
        for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}|\$([A-Za-z_]\w*)", text):
            name = match.group(1) or match.group(3)
            modifier = match.group(2) or ""
            has_default = modifier.startswith((":-", "-"))
            assert has_default or name in example_keys, f"{path.name}: ${{{name}}} has no default"


def test_env_files_are_copies_of_the_example() -> None:
    for name, (path, service) in all_services().items():
        for env_file in env_file_names(service):
            example = path.parent / f"{env_file}.example"
            assert example.is_file(), f"{name}: {env_file} has no {example.name} to copy"
    # Every rapbot service reads the operator's configuration.
    for name, (_, service) in rapbot_services().items():
        assert env_file_names(service) == ["rapbot.env"], name


def test_service_commands_are_real_rapbot_commands() -> None:
    from rapbot.cli import build_parser

    parser = build_parser()
    parsed = {}
    for name, (_, service) in rapbot_services().items():
        command = service.get("command")
        assert isinstance(command, list) and command[0] == "rapbot", name
        try:
            parsed[name] = parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(command)}` is not a valid rapbot command")
    assert parsed["worker-gpu"].command == "worker" and parsed["worker-gpu"].queues == "gpu"
    assert parsed["worker-cpu"].command == "worker" and parsed["worker-cpu"].queues == "cpu"
    for bot in ("telegram", "discord"):
        assert parsed[bot].command == "serve" and parsed[bot].platform == bot
        assert parsed[bot].gateway == "celery"
    # The images' default commands are real commands too.
    for dockerfile in (BOT_DOCKERFILE, WORKER_DOCKERFILE):
        cmd = [
            args
            for instruction, args in dockerfile_instructions(dockerfile)
            if instruction == "CMD"
        ]
        words = yaml.safe_load(cmd[-1])
        assert words[0] == "rapbot"
        parser.parse_args(words[1:])


def test_per_service_environment_is_valid_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The example plus each service's own `environment:` is a valid configuration."""
    from rapbot.settings import load_settings

    monkeypatch.chdir(tmp_path)
    for name, (_, service) in rapbot_services().items():
        clean_rapbot_environment(monkeypatch)
        for key, value in (service.get("environment") or {}).items():
            monkeypatch.setenv(key, "" if value is None else str(value))
        settings = load_settings(config_file=ENV_EXAMPLE)
        if name.startswith("worker"):
            assert str(settings.data_dir) == "/data", name
            assert settings.worker_ready_file is not None, name
            assert not settings.telegram_bot_token.get_secret_value(), name
        else:
            assert settings.gateway == "celery", name


def _compose_schema_validator():
    import json
    from importlib.resources import files

    jsonschema = pytest.importorskip("jsonschema")
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("path", [COMPOSE, *EXTRA_COMPOSE], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    validator = _compose_schema_validator()
    document = yaml.safe_load(path.read_text())
    problems = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)
    ]
    assert not problems, problems


def test_the_schema_check_catches_mistakes() -> None:
    """The validator is not vacuous: typical slips in a compose file are refused."""
    validator = _compose_schema_validator()
    document = yaml.safe_load(COMPOSE.read_text())
    document["services"]["redis"]["healthcheck"]["intervall"] = "10s"  # a typo'd key
    document["services"]["qdrant"]["ports"] = {"6333": 6333}  # a mapping where a list belongs
    paths = {"/".join(map(str, e.path)) for e in validator.iter_errors(document)}
    assert "services/redis/healthcheck" in paths and "services/qdrant/ports" in paths


def test_docker_compose_config_accepts_the_stack(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60
    )
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    # A copy of deploy/ with the example as the operator's rapbot.env; the build context (..)
    # is the copy's parent, which `config` does not need to read.
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    shutil.copy(ENV_EXAMPLE, copy / "rapbot.env")
    files = [arg for path in [COMPOSE, *EXTRA_COMPOSE] for arg in ("-f", str(copy / path.name))]
    profiles = ["--profile", "telegram", "--profile", "discord", "--profile", "monitoring"]
    result = subprocess.run(
        [docker, "compose", *files, *profiles, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_prometheus_scrapes_every_rapbot_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    names = set()
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            assert sd["type"] == "A" and sd["port"] == 9100, job["job_name"]
            names.update(sd["names"])
    assert set(rapbot_services()) <= names, sorted(set(rapbot_services()) - names)
    for name, (_, service) in rapbot_services().items():
        assert "9100" in [str(port) for port in service.get("expose", [])], name


# ----------------------------------------------------------------------------- configuration


def test_the_example_configuration_validates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from rapbot.settings import load_settings

    clean_rapbot_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no ./.env of a developer
    settings = load_settings(config_file=ENV_EXAMPLE)
    assert settings.store == "qdrant"
    assert settings.qdrant_url == "http://qdrant:6333"
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.result_backend == "redis://redis:6379/1"
    assert settings.blob_url == "redis://redis:6379/2"
    assert settings.profile == "gpu"
    assert settings.log_format == "json"
    assert settings.metrics_port == 9100
    # Secrets are left for the operator.
    assert not settings.telegram_bot_token.get_secret_value()
    assert not settings.discord_bot_token.get_secret_value()
    assert not settings.qdrant_api_key.get_secret_value()


def test_every_example_key_is_a_known_setting() -> None:
    from rapbot.settings import known_variables

    known = known_variables()
    set_keys, commented = env_example_keys()
    unknown = sorted({k for k in set_keys + commented if k not in known})
    assert not unknown, f"not settings: {unknown}"
    duplicates = sorted({k for k in set_keys if set_keys.count(k) > 1})
    assert not duplicates, duplicates
    # The commented-out examples are valid values too.
    lines = re.findall(r"^#\s*([A-Z][A-Z0-9_]*=.*)$", ENV_EXAMPLE.read_text(), flags=re.M)
    assert lines, "the example shows no optional settings"


def test_commented_example_values_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Uncommenting any suggested line keeps the configuration valid."""
    from rapbot.settings import load_settings

    clean_rapbot_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    text = ENV_EXAMPLE.read_text()
    uncommented = re.sub(r"^#\s*([A-Z][A-Z0-9_]*=)", r"\1", text, flags=re.M)
    config = tmp_path / "rapbot.env"
    config.write_text(uncommented)
    load_settings(config_file=config)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", [BOT_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_existing_files(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0][0] in ("FROM", "ARG"), dockerfile.name
    sources = copy_sources(dockerfile)
    assert sources, dockerfile.name
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
        assert not dockerignore_excludes(source), f"{dockerfile.name}: .dockerignore drops {source}"
    # Never root at run time.
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), dockerfile.name


def test_dockerignore_keeps_secrets_and_the_venv_out() -> None:
    for path in (".venv/bin/python", ".git/config", "deploy/rapbot.env", "tests/test_deploy.py"):
        assert dockerignore_excludes(path), path
    assert not dockerignore_excludes("engine/engine.py")


def test_the_bot_image_installs_no_model_libraries() -> None:
    names = requirement_names(BOT_REQUIREMENTS)
    heavy = sorted(set(names) & set(HEAVY_DISTRIBUTIONS))
    assert not heavy, f"requirements-bot.txt lists {heavy}"
    for needed in ("celery", "python-telegram-bot", "discord.py", "pydantic-settings"):
        assert needed in names, needed
    runs = [
        args
        for instruction, args in dockerfile_instructions(BOT_DOCKERFILE)
        if instruction == "RUN"
    ]
    installs = [run for run in runs if "pip install" in run]
    assert installs, "the bot image installs nothing"
    for run in installs:
        assert not re.search(
            r"\b(torch|torchvision|open.clip|ultralytics|transformers)\b", run.split("python -c")[0]
        ), run
        # The project goes in without its own (engine) dependencies.
        if "/tmp/rapbot" in run and "requirements" not in run:
            assert "--no-deps" in run, run


def test_the_worker_image_installs_the_engine_and_workers() -> None:
    text = WORKER_DOCKERFILE.read_text()
    assert "torch" in text and "workers" in text
    assert re.search(r"^USER\s+rapbot", text, flags=re.M)


# ----------------------------------------------------------------------------- slim bot


BOT_SMOKE = textwrap.dedent(
    """
    import asyncio, importlib.abc, importlib.util, sys

    HEAVY = set(sys.argv[1].split(","))


    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{name} is not in the slim bot image")
            return None


    sys.meta_path.insert(0, Blocked())

    import rapbot.settings  # noqa: E402

    if importlib.util.find_spec("rapbot.metrics") is not None:
        import rapbot.metrics  # noqa: F401

    import telegram.ext  # noqa: E402

    from rapbot import cli  # noqa: E402
    from workers.client import CeleryGateway  # noqa: E402

    seen = {}


    def engine_gateway(gateway):  # through wrappers (rapbot.metrics.AnswerTimings)
        while getattr(gateway, "inner", None) is not None:
            gateway = gateway.inner
        return type(gateway).__name__


    def run_polling(app, *args, **kwargs):  # instead of connecting to Telegram
        from bots.telegram_adapter import rapbot_of

        core = rapbot_of(app).core
        seen["telegram"] = (engine_gateway(core.gateway), len(app.handlers[0]))


    telegram.ext.Application.run_polling = run_polling

    from bots.discord_adapter.app import RapbotBot  # noqa: E402


    async def start(bot, token, *, reconnect=True):  # instead of connecting to Discord
        await bot.setup_hook()
        names = sorted(c.name for c in bot.tree.get_commands())
        seen["discord"] = (engine_gateway(bot.core.gateway), names)


    RapbotBot.start = start

    assert cli.main(["serve", "telegram", "--gateway", "celery"]) == 0
    assert cli.main(["serve", "discord", "--gateway", "celery"]) == 0
    assert seen["telegram"][0] == "CeleryGateway" and seen["telegram"][1] > 0, seen
    assert seen["discord"][0] == "CeleryGateway" and "who" in seen["discord"][1], seen
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    assert not loaded, loaded
    print("slim bot ok", seen)
    """
)


def test_the_bots_start_without_model_libraries(tmp_path: Path) -> None:
    """What `rapbot serve telegram|discord --gateway celery` builds, with torch & co. blocked:
    the CLI, the settings, the Celery gateway, PTB's Application and discord.py's bot with its
    app commands (the platform connections themselves are replaced)."""
    script = tmp_path / "bot_smoke.py"
    script.write_text(BOT_SMOKE)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAPBOT_") and k not in TOKEN_VARIABLES
    }
    env.update(
        PYTHONPATH=str(ROOT),
        TELEGRAM_BOT_TOKEN="123456789:" + "A" * 35,
        DISCORD_BOT_TOKEN="x" * 24 + "." + "y" * 6 + "." + "z" * 27,
        # Nothing listens there: building the gateway must not connect.
        RAPBOT_BROKER_URL="redis://127.0.0.1:9/0",
        RAPBOT_RESULT_BACKEND="redis://127.0.0.1:9/1",
        RAPBOT_BLOB_URL="redis://127.0.0.1:9/2",
        RAPBOT_METRICS_PORT="0",
    )
    result = subprocess.run(
        [sys.executable, str(script), ",".join(HEAVY_MODULES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "slim bot ok" in result.stdout
