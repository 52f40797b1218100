"""Terminal output: timed steps with a live status line, and plain lines when not a TTY."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape


class StepUI:
    """Prints each long step with its elapsed time; ``update`` shows sub-progress (e.g. layer 3/30)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self._status = None
        self._label = ""
        self._started = 0.0
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[StepUI]:
        """Run one named step; prints a check mark and its duration when it ends."""
        self._label = label
        self._started = time.perf_counter()
        live = self.console.is_terminal and not self.quiet
        if live:
            self._status = self.console.status(f"{label}…")
            self._status.start()
        elif not self.quiet:
            self.console.print(f"… {label}")
        try:
            yield self
        except BaseException:
            self._stop()
            if not self.quiet:
                self.console.print(f"[red]✗[/red] {label} ({time.perf_counter() - self._started:.1f}s)")
            raise
        self._stop()
        elapsed = time.perf_counter() - self._started
        self.timings[label] = elapsed
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {label} [dim]({elapsed:.1f}s)[/dim]")

    def update(self, detail: str) -> None:
        """Show what the current step is doing now."""
        if self._status is not None:
            elapsed = time.perf_counter() - self._started
            self._status.update(f"{self._label}: {detail} [dim]({elapsed:.0f}s)[/dim]")

    def note(self, text: str) -> None:
        """A line of information between steps."""
        if not self.quiet:
            self.console.print(f"  [dim]{escape(text)}[/dim]")

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Only records at ``level`` and above from the ``logging`` loggers ``names`` while the block
    runs (libraries' progress notices; the build prints its own); their levels are restored after."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, saved, strict=True):
            logger.setLevel(previous)
