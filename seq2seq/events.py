"""Where the trainer's events go besides metrics.jsonl, and what a train event averages.

A train event reports the token-weighted mean loss of the steps since the previous one (the last
batch alone zigzags with the length buckets). TensorBoard is an optional sink: its package is
imported only when a recipe asks for it, with a one-line error naming the extra when missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seq2seq.config import ConfigError

LogCallback = Callable[[dict[str, Any]], None]


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last train event."""

    loss: float = 0.0  # summed over the interval's target tokens
    nll: float = 0.0
    target_tokens: float = 0.0
    tokens: float = 0.0  # source + target tokens of every rank
    grad_norm: float = 0.0  # summed over steps
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, stats: dict[str, float], world_size: int) -> None:
        """Count one step's stats (per-token loss and nll, this rank's tokens)."""
        self.loss += stats["loss"] * stats["target_tokens"]
        self.nll += stats["nll"] * stats["target_tokens"]
        self.target_tokens += stats["target_tokens"]
        self.tokens += stats["tokens"] * world_size
        self.grad_norm += stats["grad_norm"]
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Loss and nll per target token of the interval; the mean gradient norm per step."""
        tokens = max(self.target_tokens, 1.0)
        return {"loss": self.loss / tokens, "nll": self.nll / tokens,
                "grad_norm": self.grad_norm / max(self.steps, 1)}


def summary_writer_class() -> Any:
    """TensorBoard's SummaryWriter; a one-line error naming the extra when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard = true needs TensorBoard: "
                          "pip install 'seq2seq[tensorboard]'") from None
    return SummaryWriter


class TensorBoardSink:
    """Every numeric field of every event as a TensorBoard scalar tagged ``EVENT/FIELD``
    (``train/loss``, ``valid/bleu``...) at the event's step, in ``out_dir/tensorboard``."""

    def __init__(self, out_dir: Path):
        self.writer = summary_writer_class()(log_dir=str(Path(out_dir) / "tensorboard"))

    def __call__(self, event: dict[str, Any]) -> None:
        for key, value in event.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{event['event']}/{key}", value, event["step"])
        if event["event"] == "valid":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def fan_out(*callbacks: LogCallback | None) -> LogCallback:
    """One callback that passes each event to every callback given (None ones skipped)."""
    kept = [callback for callback in callbacks if callback is not None]

    def call(event: dict[str, Any]) -> None:
        for callback in kept:
            callback(event)

    return call
