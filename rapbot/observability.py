"""One call for a process's logs and metrics endpoint (bots and workers alike).

``rapbot`` calls :func:`setup` once, before it starts a bot or a worker. Workers keep this
configuration: ``workers.runtime`` answers Celery's ``setup_logging`` signal, so Celery does
not replace the root handler with its own.
"""

from __future__ import annotations

from rapbot.logs import FORMATS, configure_logging
from rapbot.metrics import start_metrics_server


def setup(
    log_level: str, log_format: str, metrics_port: int, metrics_addr: str = "0.0.0.0"
) -> None:
    """Structured logs on stderr at ``log_level`` (DEBUG, INFO...) in ``log_format`` (``text``
    or ``json``, see :mod:`rapbot.logs`); when ``metrics_port > 0``, Prometheus metrics at
    ``http://metrics_addr:metrics_port/metrics`` (see :mod:`rapbot.metrics`).

    Raises ValueError for an unknown level or format, OSError when the port is taken."""
    fmt = (log_format or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: use {' or '.join(FORMATS)}")
    configure_logging(log_level, fmt)  # type: ignore[arg-type]  (checked just above)
    if metrics_port > 0:
        start_metrics_server(metrics_port, metrics_addr)
