"""Distributed-mode configuration: broker, result backend, blob store, limits (``RAPBOT_*``).

The same settings are read by the bots (the client side) and by the workers, so both agree on
queue names, time limits and the blob store. The engine itself is configured by
:class:`engine.settings.EngineSettings` as in local mode.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
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
