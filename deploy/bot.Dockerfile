# The chat bots' image: `rapbot serve telegram|discord --gateway celery`. No torch, no model
# libraries, no store clients: the engine runs on the workers, and the bot only sends tasks
# and photos (by reference) through Redis. A few hundred MB instead of many GB.
# Built from the repository root (compose does this):
#   docker build -f deploy/bot.Dockerfile -t rapbot-bot:local .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The bots' whole dependency set (deploy/requirements-bot.txt), then the project without its
# dependencies: pyproject.toml's list is the engine's (torch and friends).
COPY deploy/requirements-bot.txt /tmp/rapbot/requirements-bot.txt
RUN pip install -r /tmp/rapbot/requirements-bot.txt

COPY pyproject.toml README.md /tmp/rapbot/
COPY engine /tmp/rapbot/engine
COPY workers /tmp/rapbot/workers
COPY bots /tmp/rapbot/bots
COPY rapbot /tmp/rapbot/rapbot
# The check fails the build if the bot's import path ever needs a model library again.
RUN pip install --no-deps /tmp/rapbot \
    && rm -rf /tmp/rapbot \
    && python -c "import importlib.util as u; heavy = [m for m in ('torch', 'open_clip', 'ultralytics', 'transformers', 'faiss', 'qdrant_client') if u.find_spec(m)]; assert not heavy, heavy; import bots.cli, engine.engine, bots.telegram_adapter, bots.discord_adapter.client, workers.client, rapbot.settings"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin rapbot
USER rapbot
WORKDIR /home/rapbot

EXPOSE 9100
CMD ["rapbot", "serve", "telegram", "--gateway", "celery"]
