"""Cross-cutting operations code: one configuration model, logs, metrics, the doctor."""
