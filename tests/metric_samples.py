"""Reading rapbot's Prometheus samples in tests: metrics are per process, so tests compare
counts before and after what they do."""

from __future__ import annotations

from rapbot.metrics import REGISTRY, REQUEST_OUTCOMES


def metric(name: str, **labels: str) -> float:
    """A sample's current value, 0 when it has none yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request_counts(command: str) -> dict[str, float]:
    """``rapbot_requests_total`` of ``command`` by outcome, and its timings' count."""
    counts = {
        o: metric("rapbot_requests_total", command=command, outcome=o) for o in REQUEST_OUTCOMES
    }
    return counts | {"timed": metric("rapbot_request_seconds_count", command=command)}


def counted_once(before: dict[str, float], command: str, outcome: str) -> bool:
    """Whether exactly one request of ``command`` was counted (and timed) since ``before``,
    with ``outcome``."""
    after = request_counts(command)
    return {k: after[k] - before[k] for k in after} == {
        k: float(k in (outcome, "timed")) for k in after
    }
