"""Quality per CPU-minute: train a recipe under a wall-clock budget, then score it.

Translation recipes: test-set BLEU / chrF / TER (sacreBLEU, cased, detokenized, with signatures) of
``best.pt`` at beam 5 and greedy, and of the average of the last ``--average`` step checkpoints
(train with ``--set train.save_every=N`` so there are several near the end). The test files are
the recipe's ``data.test`` under ``--data``. Character-LM recipes: the validation loss in nats per
character (the last 10% of the text) of ``best.pt``.

Everything goes through the library calls the CLI uses (``train``, ``evaluate_files``,
``average_checkpoints``). With ``--skip-train`` an existing run directory is only scored. The
last line printed is one JSON object.

    python benchmarks/quality.py recipes/multi30k_de_en.toml --minutes 30 --out runs/q_de_en_30
    python benchmarks/quality.py recipes/multi30k_en_de.toml --minutes 60 --out runs/q_en_de_60 \\
        --set train.save_every=100 --set train.keep_last=8 --average 5
    python benchmarks/quality.py recipes/tinyshakespeare_char.toml --minutes 3.5 --out runs/q_lm
    python benchmarks/quality.py recipes/multi30k_en_de.toml --out runs/m30k_en_de --skip-train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from seq2seq.checkpoint import average_checkpoints, save_checkpoint, step_checkpoints
from seq2seq.config import load_recipe, resolve_path
from seq2seq.evaluate import evaluate_files
from seq2seq.train import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"  # <repo>/../shared


def training_figures(run: Path) -> dict[str, Any]:
    """Steps, training minutes, median tokens/s and MFU, and validations from metrics.jsonl."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    valid = [e for e in events if e["event"] == "valid"]
    figures: dict[str, Any] = {"validations": valid}
    if train_events:
        figures.update(
            steps=train_events[-1]["step"], train_minutes=train_events[-1]["elapsed_min"],
            median_tokens_per_s=statistics.median(e["tokens_per_s"] for e in train_events),
            median_mfu=statistics.median(e["mfu"] or 0.0 for e in train_events))
    return figures


def score(checkpoint: Path, source: Path, reference: Path, beam_size: int) -> dict[str, Any]:
    """Translate ``source`` with ``checkpoint`` and score it; also the decode wall time."""
    start = time.perf_counter()
    scores = evaluate_files(checkpoint, source, reference, None,
                            options={"beam_size": beam_size})
    return {**scores, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--data", type=Path, default=DATA, help="data.root for the recipe")
    parser.add_argument("--minutes", type=float, help="train.max_minutes (default: the recipe's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra recipe overrides, KEY=VALUE")
    parser.add_argument("--average", type=int, default=0,
                        help="also score the average of the last N step checkpoints")
    parser.add_argument("--skip-train", action="store_true", help="score an existing run")
    args = parser.parse_args()

    overrides = [f"data.root={args.data}", *args.overrides]
    if args.minutes is not None:
        overrides.append(f"train.max_minutes={args.minutes}")
    recipe = load_recipe(args.recipe, overrides)
    summary: dict[str, Any] = {"benchmark": "quality", "recipe": str(args.recipe),
                               "overrides": overrides, "run": str(args.out)}
    if not args.skip_train:
        started = time.perf_counter()
        train(recipe, args.out)
        summary["wall_minutes"] = (time.perf_counter() - started) / 60
    summary.update(training_figures(args.out))
    if recipe.data.task == "lm":
        summary["valid_loss"] = min(v["loss"] for v in summary["validations"])
        print(f"{args.recipe.name}: validation loss {summary['valid_loss']:.4f} nats/char after "
              f"{summary.get('train_minutes', 0):.1f} training minutes")
    else:
        data = recipe.data
        source = resolve_path(data.root, data.test.format(lang=data.source_lang))
        reference = resolve_path(data.root, data.test.format(lang=data.target_lang))
        candidates = {"best": args.out / "best.pt"}
        if args.average:
            steps = [path for _, path in step_checkpoints(args.out)][-args.average:]
            averaged = args.out / f"average_last{len(steps)}.pt"
            save_checkpoint(averaged, average_checkpoints(steps))
            candidates[f"average_last{len(steps)}"] = averaged
            summary["averaged"] = [path.name for path in steps]
        for name, checkpoint in candidates.items():
            for beam in (recipe.decode.beam_size, 1):
                result = score(checkpoint, source, reference, beam)
                summary[f"{name}_beam{beam}"] = result
                print(f"{name:>16s} beam {beam}: BLEU {result['bleu']:.2f}  chrF "
                      f"{result['chrf']:.2f}  ({result['seconds']:.1f} s)  "
                      f"{result['signatures']['bleu']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
