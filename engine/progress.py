"""How long-running engine work reports progress: ``progress(stage, done, total)``.

The engine counts; whoever called it shows the counts (the CLI draws a bar on stderr,
:func:`rapbot.cli.common.progress_of`). Kept free of heavy imports.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def counter(progress: Progress | None, stage: str, total: int) -> Callable[..., None]:
    """``tick(n=1)``: ``n`` more of ``total`` items of ``stage`` done, told to ``progress``
    (which hears ``done = 0`` at once, so the total shows before the first item ends)."""
    if progress is None:
        return lambda n=1: None
    done = 0
    progress(stage, done, total)

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        progress(stage, done, total)

    return tick
