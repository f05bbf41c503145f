"""A rich progress bar for ``seq2seq train``: step, loss, tokens/s, learning rate and ETA.

It consumes the events the trainer emits (the same ones written to metrics.jsonl), so the
training loop itself never prints.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from seq2seq.config import TrainConfig
from seq2seq.train import budget_fraction

log = logging.getLogger(__name__)
RESOLUTION = 1000  # the bar counts thousandths of the budget (steps or minutes, whichever first)


class TrainingProgress:
    """Context manager turning trainer events into a progress bar and log lines."""

    def __init__(self, config: TrainConfig, console: Console):
        self.config = config
        self.bounded = bool(config.max_steps or config.max_minutes or config.max_epochs)
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(),
                            TextColumn("{task.description}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                            transient=False, disable=not console.is_terminal)
        self.task_id = self.bar.add_task("starting", total=RESOLUTION if self.bounded else None)

    def __enter__(self) -> TrainingProgress:
        self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.bar.stop()

    def update(self, event: dict[str, Any]) -> None:
        """Show a train event on the bar; log validation events."""
        if event["event"] == "valid":
            shown = ", ".join(f"{k} {v:.3f}" for k, v in event.items() if isinstance(v, float))
            log.info("validation at step %d: %s", event["step"], shown)
            return
        text = (f"step {event['step']}  loss {event['loss']:.3f}  "
                f"{event['tokens_per_s']:,.0f} tok/s  lr {event['lr']:.2e}")
        if event.get("mfu"):
            text += f"  MFU {event['mfu']:.0%}"
        fraction = event.get("budget")
        if fraction is None:
            fraction = budget_fraction(self.config, event["step"], event["elapsed_min"] * 60.0)
        self.bar.update(self.task_id, description=text,
                        completed=min(fraction, 1.0) * RESOLUTION if self.bounded else None)
        if not self.bar.console.is_terminal:
            log.info(text)
