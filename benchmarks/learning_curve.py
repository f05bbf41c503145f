"""Learning curve: test BLEU after several wall-clock training budgets, one run per budget.

The schedule is budget-aware (warm-up, then halvings over the last third of the budget), so a
10-minute run is not the first third of a 30-minute one: each budget trains its own run
directory, ``OUT/<minutes>min``, through ``train()``, and each is scored as
``benchmarks/quality.py`` scores a run (``best.pt`` on the test set at the recipe's beam size and
greedy; quality.py's functions). ``--peer RUN_DIR`` adds an OpenNMT-py run of
``../shared/peers/train_onmt.sh`` made on this machine and decoded by ``translate_onmt.sh``: its
BLEU at its budget (meta.txt's ``budget_s``) joins the table and the plot. The budgets are not
quite the same clock: ``train.max_minutes`` counts training steps only (tokenizer, data loading
and validations are outside it; the table's wall minutes include them), the peer's is the wall
clock of its trainer process.

Prints the machine, a Markdown table (also written to ``OUT/learning_curve.md``), writes
``OUT/learning_curve.png`` when matplotlib is installed, and its last line is one JSON object.

    python benchmarks/learning_curve.py recipes/multi30k_de_en.toml --out runs/curve --threads 2 \\
        --peer ~/peers/runs/onmt_10m --peer ~/peers/runs/onmt_20m --peer ~/peers/runs/onmt_30m
    python benchmarks/learning_curve.py recipes/multi30k_de_en.toml --out runs/curve --skip-train
    python benchmarks/learning_curve.py recipes/toy_reverse.toml --minutes 0.02 0.04 --out /tmp/c
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from peers import PeerFileError, read_onmt_train_run
from quality import DATA, measure_machine, reference_files, score_beams, training_figures

from seq2seq.config import load_recipe
from seq2seq.train import train

TOOLS = {"onmt": "OpenNMT-py"}  # peer tool names as the peer scripts write them -> labels
OURS = "seq2seq"
DASH = "–"


def run_dir(out: Path, minutes: float) -> Path:
    """The run directory of one budget: ``OUT/10min``, ``OUT/0.5min``."""
    return out / f"{minutes:g}min"


def curve_row(minutes: float, run: Path, scores: dict[str, Any], beam: int,
              wall_minutes: float | None) -> dict[str, Any]:
    """One budget's figures: training (metrics.jsonl), wall time and test BLEU at both beams."""
    figures = training_figures(run)
    return {"budget_minutes": minutes, "run": str(run),
            "train_minutes": figures.get("train_minutes"), "wall_minutes": wall_minutes,
            "steps": figures.get("steps"), "tokens_per_s": figures.get("median_tokens_per_s"),
            "bleu_beam": scores[f"best_beam{beam}"]["bleu"],
            "bleu_greedy": scores["best_beam1"]["bleu"], "scores": scores}


def peer_point(path: Path, beam: int) -> dict[str, Any]:
    """A peer run's budget, outcome and BLEU at ``beam`` and greedy (None where not decoded)."""
    run = read_onmt_train_run(path)
    if run["budget_s"] <= 0:
        raise PeerFileError(f"{path}: budget_s {run['budget_s']} is no wall-clock budget; a "
                            "learning-curve point needs a run of train_onmt.sh BUDGET_S > 0")
    bleu = {}
    for decode in run["decodes"]:
        bleu.setdefault(decode["beam"], decode["bleu"])  # the first batch size of each beam
    return {"tool": TOOLS.get(run["tool"], run["tool"]), "run": run["run"],
            "budget_minutes": run["budget_s"] / 60, "steps": run["final_step"],
            "tokens_per_s": run["throughput"].get("src_plus_tgt_tok_per_s"),
            "bleu_beam": bleu.get(beam), "bleu_greedy": bleu.get(1), "details": run}


def _budget_key(minutes: float) -> float:
    return round(minutes * 60, 1)  # seconds: peers record whole seconds


def _cell(value: float | int | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], peers: list[dict[str, Any]], beam: int) -> str:
    """One line per budget (ours and the peers'), a BLEU column pair per peer tool."""
    tools = list(dict.fromkeys(peer["tool"] for peer in peers))
    by_budget: dict[float, dict[str, Any]] = {_budget_key(r["budget_minutes"]): {OURS: r}
                                              for r in rows}
    for peer in peers:
        cell = by_budget.setdefault(_budget_key(peer["budget_minutes"]), {})
        if peer["tool"] in cell:
            raise PeerFileError(f"{peer['run']} and {cell[peer['tool']]['run']} are both "
                                f"{peer['tool']} runs with a {peer['budget_minutes']:g}-minute "
                                "budget; give one per budget")
        cell[peer["tool"]] = peer
    header = ["budget min", "training min", "wall min", "steps", "tokens/s",
              f"BLEU beam {beam}", "BLEU greedy"]
    header += [f"{tool} {kind}" for tool in tools for kind in (f"BLEU beam {beam}", "greedy")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(by_budget):
        cell = by_budget[key]
        ours = cell.get(OURS, {})
        values = [f"{key / 60:.4g}", _cell(ours.get("train_minutes"), ".1f"),
                  _cell(ours.get("wall_minutes"), ".1f"), _cell(ours.get("steps"), "d"),
                  _cell(ours.get("tokens_per_s"), ".0f"), _cell(ours.get("bleu_beam"), ".2f"),
                  _cell(ours.get("bleu_greedy"), ".2f")]
        for tool in tools:
            peer = cell.get(tool, {})
            values += [_cell(peer.get("bleu_beam"), ".2f"), _cell(peer.get("bleu_greedy"), ".2f")]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], peers: list[dict[str, Any]], beam: int, title: str,
         path: Path) -> str | None:
    """BLEU against the budget, one line per tool (beam solid, greedy dashed); writes ``path``.
    Returns why there is no plot, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot: pip install -e '.[plot]'"
    series = {OURS: rows} | {tool: [p for p in peers if p["tool"] == tool]
                             for tool in dict.fromkeys(p["tool"] for p in peers)}
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for index, (tool, points) in enumerate(series.items()):
        points = sorted(points, key=lambda point: point["budget_minutes"])
        color = f"C{index}"
        for key, style, label in (("bleu_beam", "-o", f"beam {beam}"),
                                  ("bleu_greedy", "--s", "greedy")):
            xy = [(p["budget_minutes"], p[key]) for p in points if p[key] is not None]
            if xy:
                axes.plot(*zip(*xy, strict=True), style, color=color, label=f"{tool}, {label}")
    axes.set(xlabel="training budget (minutes of wall clock)", ylabel="test BLEU", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def train_and_score(args: argparse.Namespace, overrides: list[str],
                    minutes: float) -> dict[str, Any]:
    """Train one budget's run (unless ``--skip-train``), then score its best.pt."""
    recipe = load_recipe(args.recipe, [*overrides, f"train.max_minutes={minutes}"])
    run = run_dir(args.out, minutes)
    files = reference_files(recipe, run)
    wall_file = run / "wall_minutes.txt"
    if not args.skip_train:
        print(f"training {args.recipe.name} for {minutes:g} minutes -> {run}", flush=True)
        started = time.perf_counter()
        train(recipe, run)
        wall_file.write_text(f"{(time.perf_counter() - started) / 60}\n", encoding="utf-8")
    if not (run / "best.pt").is_file():
        raise SystemExit(f"{run}: no best.pt; train it first (run without --skip-train)")
    wall = float(wall_file.read_text()) if wall_file.is_file() else None
    beam = recipe.decode.beam_size
    print(f"{run}:")
    scores = score_beams("best", run / "best.pt", files, (beam, 1))
    return curve_row(minutes, run, scores, beam, wall)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="directory of the runs")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 20.0, 30.0],
                        help="wall-clock training budgets, one run each")
    parser.add_argument("--data", type=Path, default=DATA, help="data.root for the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="recipe override for every run, KEY=VALUE (repeatable)")
    parser.add_argument("--threads", type=int, help="train.threads (CPU threads)")
    parser.add_argument("--skip-train", action="store_true", help="score existing runs")
    parser.add_argument("--peer", type=Path, action="append", default=[],
                        help="an OpenNMT-py run directory of train_onmt.sh with its "
                        "decode/*/summary.txt, made on this machine (repeatable)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    overrides = [f"data.root={args.data}", *args.overrides]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    recipe = load_recipe(args.recipe, overrides)
    if recipe.data.task != "translation":
        raise SystemExit(f"{args.recipe}: learning_curve.py scores translation recipes by BLEU; "
                         "use benchmarks/quality.py for a character LM")
    beam = recipe.decode.beam_size
    try:  # the peers first: a bad file fails before any training
        peers = [peer_point(path, beam) for path in args.peer]
        markdown_table([], peers, beam)
    except PeerFileError as error:
        raise SystemExit(str(error)) from None
    done = [run for run in (run_dir(args.out, m) for m in args.minutes)
            if (run / "last.pt").exists()]
    if done and not args.skip_train:
        raise SystemExit(f"{', '.join(map(str, done))} already hold(s) a run; score with "
                         "--skip-train or choose another --out")
    machine = measure_machine(recipe)
    rows = [train_and_score(args, overrides, minutes) for minutes in sorted(args.minutes)]
    table = markdown_table(rows, peers, beam)
    print(table)
    (args.out / "learning_curve.md").write_text(table + "\n", encoding="utf-8")
    png = args.out / "learning_curve.png"
    threads = machine["threads"]
    note = plot(rows, peers, beam, f"{args.recipe.stem} on {machine['cpu']}, {threads} "
                f"thread{'s' if threads > 1 else ''}", png)
    print(note or f"plot: {png}")
    print(json.dumps({"benchmark": "learning_curve", "recipe": str(args.recipe),
                      "overrides": overrides, "out": str(args.out), "beam": beam,
                      "machine": machine, "runs": rows, "peers": peers,
                      "table": str(args.out / "learning_curve.md"),
                      "plot": None if note else str(png), "plot_note": note}))


if __name__ == "__main__":
    main()
