"""Quality per CPU-minute: train a recipe under a wall-clock budget, then score it.

Translation recipes: test-set BLEU / chrF / TER (sacreBLEU, cased, detokenized, with signatures) of
``best.pt`` at beam 5 and greedy, and of the average of the last ``--average`` step checkpoints
(train with ``--set train.save_every=N`` so there are several near the end). Character-LM
recipes: the validation loss in nats per character (the last 10% of the text) of ``best.pt``.

Everything goes through the library calls the CLI uses (``train``, ``evaluate_files``,
``average_checkpoints``). Line-aligned corpora are scored on the recipe's ``data.test`` files
under ``--data``; other formats on their test split written to the run directory (toy_reverse
generates one from the seed). With ``--skip-train`` an existing run directory is only scored.
The machine (CPU, ISA, fp32 matmul peak) is printed and recorded. The last line printed is one
JSON object. ``benchmarks/learning_curve.py`` runs this at several budgets.

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

import torch
from machine import describe_machine, machine_line

from seq2seq.checkpoint import average_checkpoints, save_checkpoint, step_checkpoints
from seq2seq.config import Recipe, load_recipe, resolve_path
from seq2seq.data import read_parallel
from seq2seq.evaluate import evaluate_files
from seq2seq.train import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"  # <repo>/../shared


def training_figures(run: Path) -> dict[str, Any]:
    """Steps (the last event's: the final validation), training minutes, median tokens/s and
    MFU, and the validations, from metrics.jsonl; a run too short to log a training event has
    only its steps and validations."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    valid = [e for e in events if e["event"] == "valid"]
    figures: dict[str, Any] = {"validations": valid}
    if events:
        figures["steps"] = max(e["step"] for e in events)
    if train_events:
        figures.update(
            train_minutes=train_events[-1]["elapsed_min"],
            median_tokens_per_s=statistics.median(e["tokens_per_s"] for e in train_events),
            median_mfu=statistics.median(e["mfu"] or 0.0 for e in train_events))
    return figures


def score(checkpoint: Path, source: Path, reference: Path, beam_size: int) -> dict[str, Any]:
    """Translate ``source`` with ``checkpoint`` and score it; also the decode wall time."""
    start = time.perf_counter()
    scores = evaluate_files(checkpoint, source, reference, None,
                            options={"beam_size": beam_size})
    return {**scores, "seconds": time.perf_counter() - start}


def reference_files(recipe: Recipe, run: Path) -> tuple[Path, Path]:
    """The test set as (source, reference) files: the recipe's ``data.test`` files for
    line-aligned data, else its test split written to ``run`` (toy_reverse generates one)."""
    data = recipe.data
    if data.format == "lines":
        files = tuple(resolve_path(data.root, data.test.format(lang=lang))
                      for lang in (data.source_lang, data.target_lang))
        for path in files:
            if not path.is_file():
                raise SystemExit(f"{path}: no such test file; pass --data DIR holding the "
                                 f"recipe's data.test = {data.test!r}")
        return files[0], files[1]
    pairs = read_parallel(data, "test", recipe.train.seed)
    run.mkdir(parents=True, exist_ok=True)
    source, reference = run / "test.source.txt", run / "test.reference.txt"
    source.write_text("".join(f"{src}\n" for src, _ in pairs), encoding="utf-8")
    reference.write_text("".join(f"{tgt}\n" for _, tgt in pairs), encoding="utf-8")
    return source, reference


def score_beams(name: str, checkpoint: Path, files: tuple[Path, Path],
                beams: tuple[int, ...]) -> dict[str, Any]:
    """``{name}_beam{k}``: the scores of ``checkpoint`` on the test files at each beam size."""
    results = {}
    for beam in dict.fromkeys(beams):  # once each, in order
        result = results[f"{name}_beam{beam}"] = score(checkpoint, *files, beam)
        print(f"{name:>16s} beam {beam}: BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  "
              f"({result['seconds']:.1f} s)  {result['signatures']['bleu']}")
    return results


def measure_machine(recipe: Recipe) -> dict[str, Any]:
    """The machine description, its matmul peak measured on the threads the trainer uses."""
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    machine = describe_machine()
    print(machine_line(machine))
    return machine


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
                               "overrides": overrides, "run": str(args.out),
                               "machine": measure_machine(recipe)}
    if recipe.data.task != "lm":
        files = reference_files(recipe, args.out)  # before training: a missing file fails fast
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
        candidates = {"best": args.out / "best.pt"}
        if args.average:
            steps = [path for _, path in step_checkpoints(args.out)][-args.average:]
            averaged = args.out / f"average_last{len(steps)}.pt"
            save_checkpoint(averaged, average_checkpoints(steps))
            candidates[f"average_last{len(steps)}"] = averaged
            summary["averaged"] = [path.name for path in steps]
        summary["test_files"] = [str(path) for path in files]
        for name, checkpoint in candidates.items():
            summary.update(score_beams(name, checkpoint, files, (recipe.decode.beam_size, 1)))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
