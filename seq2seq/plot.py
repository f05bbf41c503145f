"""Figures: training curves from metrics.jsonl and attention heatmaps (matplotlib, optional)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seq2seq.data import DataError


def _pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend; a clear error when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("plotting needs matplotlib: pip install 'seq2seq[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The events of a run's metrics.jsonl; errors name the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no metrics file; is {run_dir} a run directory?")
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}, line {number}: not a JSON object") from None
    return events


def plot_metrics(run_dir: Path, output: Path) -> Path:
    """Training loss and validation loss (and BLEU when present) against steps, as one PNG."""
    plt = _pyplot()
    events = read_metrics(run_dir)
    train = [e for e in events if e.get("event") == "train"]
    valid = [e for e in events if e.get("event") == "valid"]
    has_bleu = any("bleu" in e for e in valid)
    figure, axes = plt.subplots(1, 2 if has_bleu else 1, figsize=(11 if has_bleu else 6, 4),
                                squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
    loss_axis.plot([e["step"] for e in valid], [e["loss"] for e in valid], "o-", label="valid NLL")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("nats per token")
    loss_axis.legend()
    if has_bleu:
        axes[0][1].plot([e["step"] for e in valid], [e["bleu"] for e in valid], "o-")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("validation BLEU")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def attention_figure(tokenizer: Any, source: str, hypothesis: Any) -> Any:
    """The figure of one hypothesis' attention: target tokens (rows) over source tokens
    (columns), shaded from 0 to its own largest weight (a weak model's diffuse attention
    would be all white on a 0-1 scale), with a colour bar."""
    plt = _pyplot()
    src = [_piece(tokenizer, i) for i in tokenizer.encode(source)] + ["</s>"]
    tgt = [_piece(tokenizer, i) for i in hypothesis.tokens] + ["</s>"]
    weights = hypothesis.attention[: len(tgt), : len(src)].float().numpy()
    figure, axis = plt.subplots(figsize=(max(4, 0.4 * len(src)), max(3, 0.35 * len(tgt))))
    image = axis.imshow(weights, cmap="Greys", aspect="auto", vmin=0.0,
                        vmax=float(weights.max()) or 1.0)
    figure.colorbar(image, ax=axis)
    axis.set_xticks(range(len(src)), src, rotation=90)
    axis.set_yticks(range(len(tgt)), tgt)
    figure.tight_layout()
    return figure


def attention_heatmap(path: Path, tokenizer: Any, source: str, hypothesis: Any) -> Path:
    """Write :func:`attention_figure` to ``path`` (PNG)."""
    plt = _pyplot()
    figure = attention_figure(tokenizer, source, hypothesis)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token]) or "▁"
