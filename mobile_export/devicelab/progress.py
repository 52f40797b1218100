"""Progress while a plan runs (which device, which bundle, repetition n/m, ETA) and the closing summary."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def outcome_text(record: dict) -> str:
    """A measurement in a few words: its speed, or why it failed."""
    if record["status"] == "ok":
        m = record["metrics"]
        return (
            f"ok · ttft {m['ttft_s'] * 1000:.1f} ms · prefill {m['prefill_tokens_per_s']:.0f} tok/s · "
            f"decode {m['decode_tokens_per_s']:.1f} tok/s · peak {m['peak_memory_bytes'] / 1e6:.0f} MB"
        )
    reason = (record.get("failure") or {}).get("reason", "")
    return f"{record['status'].upper()}: {reason}"


class BenchProgress:
    """A live bar on a terminal; one line per measurement (with ETA) otherwise, or nothing when quiet."""

    def __init__(self, quiet: bool = False, stream=None):
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._task = None
        self.total = 0
        self.done = 0
        self._started = 0.0
        self._label = ""

    def start(self, total: int) -> None:
        """Begin counting ``total`` measurements."""
        self.total = total
        self._started = time.monotonic()
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=total)

    def note(self, text: str) -> None:
        """A line of information (device connected, bundle copied...)."""
        if self.quiet:
            return
        self.console.print(f"  [dim]{escape(text)}[/dim]")

    def measuring(self, device: str, bundle: str, scenario: str, repetition: int, repetitions: int) -> None:
        """Say which measurement is being taken."""
        self._label = f"{device} · {bundle} · {scenario} · rep {repetition}/{repetitions}"
        if self._progress is not None:
            self._progress.update(self._task, description=escape(self._label))

    def measured(self, record: dict) -> None:
        """One measurement was recorded."""
        self.done += 1
        if self.done > self.total:
            self.total = self.done
        if self.quiet:
            return
        label = (
            f"{record['device']['name']} · {record['bundle']['name']} · {record['scenario']['name']} · "
            f"rep {record['repetition']}/{record['scenario']['repetitions']}"
        )
        line = f"[{self.done}/{self.total}] {label}: {outcome_text(record)}"
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, total=self.total)
            self._progress.console.print(escape(line), markup=False)
        else:
            elapsed = time.monotonic() - self._started
            eta = elapsed / self.done * (self.total - self.done)
            self.console.print(escape(line) + f"  (ETA {_clock(eta)})", markup=False)

    def stop(self) -> None:
        """Remove the live bar."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def print_summary(summary, groups: list[dict], stream=None) -> None:
    """The closing summary: a table of medians per bundle x device x scenario, and counts."""
    console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True, width=160)
    if not summary.records:
        console.print(
            f"nothing to measure: all {summary.already_done} measurements are already in {summary.results_path}"
        )
        return
    table = Table(title="Benchmark (medians over repetitions)", title_justify="left")
    for column in (
        "device",
        "bundle",
        "scenario",
        "ok",
        "failed",
        "load ms",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s",
        "peak MB",
    ):
        table.add_column(column, justify="left" if column in ("device", "bundle", "scenario") else "right")

    def cell(group: dict, metric: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        stats = group["metrics"].get(metric)
        return fmt.format(stats["median"] * scale) if stats else "-"

    for group in groups:
        counts = group["runs"]
        table.add_row(
            group["device"],
            group["bundle"],
            group["scenario"],
            str(counts["ok"]),
            str(counts["failed"] + counts["timeout"] + counts["skipped"]),
            cell(group, "load_s", 1000),
            cell(group, "ttft_s", 1000),
            cell(group, "prefill_tokens_per_s"),
            cell(group, "decode_tokens_per_s"),
            cell(group, "peak_memory_bytes", 1e-6, "{:.0f}"),
        )
    console.print(table)
    console.print(
        f"{summary.measured} measured now ({summary.failed} failed), {summary.already_done} already in "
        f"{summary.results_path} from earlier runs"
    )
    for line in summary.problems:
        console.print(f"[yellow]warning:[/yellow] {escape(line)}")
