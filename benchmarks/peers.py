"""The figures of OpenNMT-py peer runs, read from the files that ``../shared/peers`` writes.

A peer's speed is a ratio only when it was measured on the same machine in the same session, so
no benchmark carries a peer number: each one takes the peer's files as arguments and reads them
here. ``translate_onmt.sh RUN BEAM BATCH`` writes ``RUN/decode/NAME/summary.txt``;
``train_onmt.sh`` writes ``RUN/meta.txt`` and ``RUN/throughput.txt``. Standard library only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# sacreBLEU's text format: "BLEU|nrefs:1|...|version:2.4.3 = 35.12 67.2/42.1/... (BP = ...)"
SCORE = re.compile(r"^(?P<signature>(?P<metric>BLEU|chrF\S*?)\|\S+) = (?P<score>[\d.]+)")
TOOL = re.compile(r"^tool \S+ run (?P<run>.*) ckpt (?P<ckpt>.*)$")
STEP = re.compile(r"model_step_(\d+)\.pt$")


class PeerFileError(ValueError):
    """A peer file that is missing or not in the format the peer scripts write."""


def _number(text: str) -> int | float | None:
    """``"64"`` -> 64, ``"24.5"`` -> 24.5, ``"NA"`` -> None."""
    if text == "NA":
        return None
    return float(text) if any(c in text for c in ".eE") else int(text)


def _pairs(line: str, path: Path) -> dict[str, str]:
    """``"key value key value"`` -> {key: value}."""
    words = line.split()
    if len(words) % 2:
        raise PeerFileError(f"{path}: line {line!r} is not 'key value' pairs")
    return dict(zip(words[::2], words[1::2], strict=True))


def _read(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise PeerFileError(f"{path}: no such file; pass {what}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _seconds(clock: str) -> float:
    """``/usr/bin/time``'s elapsed time, ``"[h:]mm:ss.ss"``, in seconds."""
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def read_onmt_decode_summary(path: str | Path) -> dict[str, Any]:
    """Beam, batch, sentences, times, sentences/s, peak RSS, BLEU and chrF of one decode.

    ``sentences_per_s_gen`` is decode-only (OpenNMT-py's ``-report_time``), ``..._wall`` the whole
    process (start-up and model loading included); ``None`` where the script wrote NA.
    """
    path = Path(path)
    lines = _read(path, "a summary.txt written by translate_onmt.sh")
    fields: dict[str, Any] = {"path": str(path)}
    for line in lines:
        first = line.split()[0]
        match = SCORE.match(line)
        if match:
            metric = "bleu" if match["metric"] == "BLEU" else "chrf"
            fields[metric] = float(match["score"])
            fields[f"{metric}_signature"] = match["signature"]
        elif first == "tool":  # "tool onmt run RUN_DIR ckpt CHECKPOINT"
            tool = TOOL.match(line)
            fields.update(tool=line.split()[1], run=tool and tool["run"],
                          checkpoint=tool and tool["ckpt"])
        elif first in ("beam", "wall_s", "gen_s", "peak_rss_mib"):
            for key, value in _pairs(line, path).items():
                fields[key.replace("sents_", "sentences_")] = _number(value)
        elif first == "load_before":
            before, _, after = line.removeprefix("load_before").partition("load_after")
            fields.update(load_before=before.strip(), load_after=after.strip())
    missing = [key for key in ("tool", "beam", "sentences", "wall_s", "bleu") if key not in fields]
    if missing:
        raise PeerFileError(f"{path}: no {', '.join(missing)} line(s); is it a summary.txt "
                            "written by translate_onmt.sh?")
    return fields


def read_onmt_train_run(run_dir: str | Path) -> dict[str, Any]:
    """A ``train_onmt.sh`` run: budget, settings, outcome (meta.txt), throughput.txt's figures,
    and every ``decode/*/summary.txt`` in it (sorted by beam, then batch)."""
    run = Path(run_dir)
    lines = _read(run / "meta.txt", "a run directory written by train_onmt.sh")
    fields: dict[str, Any] = {"run": str(run), "name": run.name, "final_step": None}
    for line in lines:
        words = line.split()
        if words[0] == "tool":  # "tool onmt 3.5.1 torch 2.5.1"
            fields.update(tool=words[1], version=words[2] if len(words) > 2 else None,
                          torch=words[4] if len(words) > 4 else None)
        elif words[0] in ("budget_s", "peak_rss_mib"):
            for key, value in _pairs(line, run / "meta.txt").items():
                fields[key] = _seconds(value) if key == "wall" else _number(value)
        elif words[0] == "end" and "rc" in words:
            fields["rc"] = int(words[words.index("rc") + 1])
        elif words[0] == "final_checkpoint":
            step = STEP.search(words[-1])
            fields["final_step"] = int(step[1]) if step else None
    if "tool" not in fields or "budget_s" not in fields:
        raise PeerFileError(f"{run / 'meta.txt'}: no tool or budget_s line; is {run} a run "
                            "directory written by train_onmt.sh?")
    if "wall" in fields:
        fields["wall_s"] = fields.pop("wall")
    throughput: dict[str, float] = {}
    if (run / "throughput.txt").is_file():
        for line in _read(run / "throughput.txt", "throughput.txt"):
            words = line.split()
            if len(words) > 1 and re.fullmatch(r"[\d.]+", words[1]):
                throughput[words[0]] = float(words[1])
    fields["throughput"] = throughput
    decodes = [read_onmt_decode_summary(p) for p in sorted(run.glob("decode/*/summary.txt"))]
    fields["decodes"] = sorted(decodes, key=lambda d: (d["beam"], d.get("batch") or 0))
    return fields


def decode_summaries_by_beam(paths: list[Path]) -> dict[int, dict[str, Any]]:
    """The decode summaries keyed by their beam size; two for one beam is an error."""
    by_beam: dict[int, dict[str, Any]] = {}
    for path in paths:
        summary = read_onmt_decode_summary(path)
        if summary["beam"] in by_beam:
            raise PeerFileError(f"{path} and {by_beam[summary['beam']]['path']} are both beam "
                                f"{summary['beam']}; give one peer summary per beam size")
        by_beam[summary["beam"]] = summary
    return by_beam
