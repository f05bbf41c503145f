"""The benchmarks' shared pieces on small fixture files, without training: the peer files of
../shared/peers, the machine description, the learning-curve table and plot."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

from tests.conftest import toy_recipe

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# What translate_onmt.sh writes (bleu.sh's sacreBLEU lines last; sacreBLEU indents the BLEU line).
DECODE_SUMMARY = """\
tool onmt run /root/peers/runs/onmt_10m ckpt /root/peers/runs/onmt_10m/model/model_step_1200.pt
beam {beam} batch 64 sentences 1000
wall_s 24.5 sents_per_s_wall 40.8
gen_s {gen} sents_per_s_gen {gen_rate}
peak_rss_mib 534
load_before 0.58 0.52 0.24 load_after 1.91 1.20 0.60
  BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.4.3 = {bleu} 67.2/42.1/28.0/19.1 \
(BP = 1.000 ratio = 1.012 hyp_len = 13008 ref_len = 12852)
chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.4.3 = 60.12
"""
# What train_onmt.sh writes into meta.txt and (parse_train_log.py) throughput.txt.
META = """\
tool onmt 3.5.1 torch 2.5.1+cpu
budget_s {budget} max_steps 100000000 batch 4096 threads 2 save_steps 10
start 2026-12-01 15:06:36 load_before 0.58 0.52 0.24
end 2026-12-01 15:36:40 load_after 2.01 1.98 1.50 rc 124
load1 min 1.20 mean 2.01 max 2.30 (n=120)
peak_rss_mib 912 wall 30:02.11 exit 124
final_checkpoint /root/peers/runs/x/model/model_step_3210.pt
"""
THROUGHPUT = """\
window_steps 20-120 (100 updates) window_s 37.2
steps_per_s 2.688
tgt_tok_per_s 3000
src_plus_tgt_tok_per_s 6000 (exact)
last_logged_step 3200 first_log_to_last_log_s 1790
valid: Validation perplexity: 10.2
"""


def load(name: str) -> ModuleType:
    """A benchmark script as a module (they import each other by name from benchmarks/)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        with mock.patch.dict(os.environ):  # scripts set OMP_* defaults on import
            return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return load("peers")


@pytest.fixture(scope="module")
def curve() -> ModuleType:
    return load("learning_curve")


def write_summary(path: Path, beam: int = 5, bleu: float = 35.12, gen: str = "15.6") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gen_rate = "NA" if gen == "NA" else f"{1000 / float(gen):.1f}"
    path.write_text(DECODE_SUMMARY.format(beam=beam, bleu=bleu, gen=gen, gen_rate=gen_rate))
    return path


def write_peer_run(run: Path, budget_s: int, bleus: dict[int, float]) -> Path:
    """A train_onmt.sh run directory with one translate_onmt.sh decode per beam."""
    run.mkdir(parents=True)
    (run / "meta.txt").write_text(META.format(budget=budget_s))
    (run / "throughput.txt").write_text(THROUGHPUT)
    for beam, bleu in bleus.items():
        write_summary(run / "decode" / f"beam{beam}_b64" / "summary.txt", beam, bleu)
    return run


def test_decode_summary_is_read_field_by_field(peers, tmp_path):
    path = write_summary(tmp_path / "summary.txt")
    summary = peers.read_onmt_decode_summary(path)
    assert summary == {
        "path": str(path), "tool": "onmt", "run": "/root/peers/runs/onmt_10m",
        "checkpoint": "/root/peers/runs/onmt_10m/model/model_step_1200.pt",
        "beam": 5, "batch": 64, "sentences": 1000, "wall_s": 24.5,
        "sentences_per_s_wall": 40.8, "gen_s": 15.6, "sentences_per_s_gen": 64.1,
        "peak_rss_mib": 534, "load_before": "0.58 0.52 0.24", "load_after": "1.91 1.20 0.60",
        "bleu": 35.12, "chrf": 60.12,
        "bleu_signature": "BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.4.3",
        "chrf_signature": "chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.4.3"}


def test_decode_summary_without_a_decode_time_reads_none(peers, tmp_path):
    summary = peers.read_onmt_decode_summary(write_summary(tmp_path / "s.txt", gen="NA"))
    assert (summary["gen_s"], summary["sentences_per_s_gen"]) == (None, None)


def test_bad_or_missing_peer_files_name_the_file(peers, tmp_path):
    bad = tmp_path / "summary.txt"
    bad.write_text("beam 5 batch 64 sentences 1000\n")
    with pytest.raises(peers.PeerFileError, match=re.escape(f"{bad}: no tool, wall_s, bleu line")):
        peers.read_onmt_decode_summary(bad)
    missing = tmp_path / "none.txt"
    with pytest.raises(peers.PeerFileError, match=re.escape(f"{missing}: no such file")):
        peers.read_onmt_decode_summary(missing)
    with pytest.raises(peers.PeerFileError, match="meta.txt: no such file"):
        peers.read_onmt_train_run(tmp_path)


def test_decode_summaries_are_keyed_by_beam_once(peers, tmp_path):
    five = write_summary(tmp_path / "a" / "summary.txt", beam=5)
    one = write_summary(tmp_path / "b" / "summary.txt", beam=1)
    assert {b: s["path"] for b, s in peers.decode_summaries_by_beam([five, one]).items()} == \
        {5: str(five), 1: str(one)}
    again = write_summary(tmp_path / "c" / "summary.txt", beam=5)
    with pytest.raises(peers.PeerFileError, match="are both beam 5; give one peer summary"):
        peers.decode_summaries_by_beam([five, again])


def test_train_run_reads_meta_throughput_and_decodes(peers, tmp_path):
    run = peers.read_onmt_train_run(write_peer_run(tmp_path / "onmt_30m", 1800, {5: 30, 1: 28}))
    assert {key: run[key] for key in ("name", "tool", "version", "torch", "budget_s",
                                      "max_steps", "batch", "threads", "rc", "peak_rss_mib",
                                      "wall_s", "final_step")} == {
        "name": "onmt_30m", "tool": "onmt", "version": "3.5.1", "torch": "2.5.1+cpu",
        "budget_s": 1800, "max_steps": 100000000, "batch": 4096, "threads": 2, "rc": 124,
        "peak_rss_mib": 912, "wall_s": 30 * 60 + 2.11, "final_step": 3210}
    assert run["throughput"] == {"steps_per_s": 2.688, "tgt_tok_per_s": 3000.0,
                                 "src_plus_tgt_tok_per_s": 6000.0, "last_logged_step": 3200.0}
    assert [(d["beam"], d["bleu"]) for d in run["decodes"]] == [(1, 28.0), (5, 30.0)]


CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 {extra}

processor\t: 1
model name\t: a second block, ignored
"""


def test_cpuinfo_gives_model_numbers_and_isa_level():
    machine = load("machine")
    assert machine.parse_cpuinfo(CPUINFO.format(extra="avx512f avx512bw")) == {
        "cpu": "Intel(R) Xeon(R) Platinum 8480+", "vendor": "GenuineIntel", "family": 6,
        "model": 143, "isa": "AVX-512"}
    assert machine.parse_cpuinfo(CPUINFO.format(extra="fma"))["isa"] == "AVX2"
    assert machine.parse_cpuinfo(CPUINFO.replace("avx2", ""))["isa"] == "no AVX2"
    assert machine.parse_cpuinfo("")["cpu"] == "unknown"


def test_machine_description_uses_a_given_peak_and_says_so(monkeypatch):
    machine = load("machine")
    monkeypatch.setattr(machine, "matmul_peak_flops", lambda device: pytest.fail("measured"))
    description = machine.describe_machine(peak_flops=123.44e9)
    assert description["matmul_peak_gflops"] == 123.4
    line = machine.machine_line(description)
    assert f"family {description['family']} model {description['model']}" in line
    assert "fp32 matmul peak 123.4 GFLOP/s" in line
    assert "torch dispatches" not in machine.machine_line({**description, "isa": "AVX-512",
                                                          "isa_agrees_with_torch": True})
    assert "AVX-512 (but torch dispatches AVX2 kernels)" in machine.machine_line(
        {**description, "isa": "AVX-512", "torch_cpu_capability": "AVX2",
         "isa_agrees_with_torch": False})


def test_machine_description_says_how_openmp_threads_wait(monkeypatch):
    """The benchmarks leave OMP_WAIT_POLICY as the user has it and report it."""
    machine = load("machine")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    unset = machine.describe_machine(peak_flops=1e11)
    assert unset["omp_wait_policy"] == "default"
    assert machine.machine_line(unset).endswith("OpenMP wait policy default")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert machine.describe_machine(peak_flops=1e11)["omp_wait_policy"] == "ACTIVE"


def test_decode_ratio_only_against_the_same_sentences():
    decode_speed = load("decode_speed")
    ours = {"sentences": 1000, "sentences_per_s": 50.0}
    peer = {"path": "p", "batch": 64, "sentences": 1000, "sentences_per_s_gen": 40.0,
            "sentences_per_s_wall": 30.0}
    assert decode_speed.peer_ratio(ours, peer)["ratio_to_peer"] == 1.25
    other = decode_speed.peer_ratio({**ours, "sentences": 40}, peer)
    assert other["ratio_to_peer"] is None
    assert other["note"] == "no ratio: the peer decoded 1000 sentences, this run 40"
    assert decode_speed.peer_ratio(ours, {**peer, "sentences_per_s_gen": None})["ratio_to_peer"] \
        is None


def fake_run(curve, path: Path, minutes: float, bleus: tuple[float, float]) -> dict:
    """A learning-curve row from a fake metrics.jsonl and fake beam-5 / greedy scores."""
    path.mkdir(parents=True)
    events = [{"event": "train", "step": 50, "tokens_per_s": 1000.0, "elapsed_min": 4.0},
              {"event": "train", "step": 100, "tokens_per_s": 1200.0, "elapsed_min": 8.0},
              {"event": "train", "step": 150, "tokens_per_s": 1100.0, "elapsed_min": 9.9},
              {"event": "valid", "step": 160, "loss": 2.0, "bleu": 20.0}]
    for event in events:
        event["mfu"] = None
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    scores = {"best_beam5": {"bleu": bleus[0]}, "best_beam1": {"bleu": bleus[1]}}
    return curve.curve_row(minutes, path, scores, 5, minutes + 0.5)


def test_learning_curve_table_joins_ours_and_the_peers_by_budget(curve, tmp_path):
    rows = [fake_run(curve, tmp_path / "10min", 10, (30.12, 28.5))]
    assert {k: v for k, v in rows[0].items() if k != "scores"} == {
        "budget_minutes": 10, "run": str(tmp_path / "10min"), "train_minutes": 9.9,
        "wall_minutes": 10.5, "steps": 160, "tokens_per_s": 1100.0, "bleu_beam": 30.12,
        "bleu_greedy": 28.5}
    peers = [curve.peer_point(write_peer_run(tmp_path / "p10", 600, {5: 29, 1: 27.75}), 5),
             curve.peer_point(write_peer_run(tmp_path / "p20", 1200, {5: 31}), 5)]
    assert curve.markdown_table(rows, peers, 5).splitlines() == [
        "| budget min | training min | wall min | steps | tokens/s | BLEU beam 5 | BLEU greedy "
        "| OpenNMT-py BLEU beam 5 | OpenNMT-py greedy |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 10 | 9.9 | 10.5 | 160 | 1100 | 30.12 | 28.50 | 29.00 | 27.75 |",
        "| 20 | – | – | – | – | – | – | 31.00 | – |"]
    twice = curve.peer_point(write_peer_run(tmp_path / "p10b", 600, {5: 29}), 5)
    with pytest.raises(curve.PeerFileError, match="both OpenNMT-py runs with a 10-minute"):
        curve.markdown_table(rows, [*peers, twice], 5)


def test_learning_curve_plot_is_a_png_or_a_clear_note(curve, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [fake_run(curve, tmp_path / f"{m}min", m, (20.0 + m, 18.0 + m)) for m in (10, 20)]
    peers = [curve.peer_point(write_peer_run(tmp_path / "p", 600, {5: 25}), 5)]
    assert curve.plot(rows, peers, 5, "title", tmp_path / "curve.png") is None
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    note = curve.plot(rows, peers, 5, "title", tmp_path / "none.png")
    assert note == "matplotlib is not installed, so no plot: pip install -e '.[plot]'"
    assert not (tmp_path / "none.png").exists()


def test_toy_test_split_is_written_for_scoring(curve, tmp_path):
    quality = load("quality")
    source, reference = quality.reference_files(toy_recipe("data.toy_valid_size=7"), tmp_path)
    pairs = list(zip(source.read_text().splitlines(), reference.read_text().splitlines(),
                     strict=True))
    assert len(pairs) == 7
    assert all(tgt.split() == src.split()[::-1] for src, tgt in pairs)


def test_a_missing_test_file_is_named(tmp_path):
    quality = load("quality")
    recipe = toy_recipe("data.format=lines", f"data.root={tmp_path}")
    with pytest.raises(SystemExit, match="test_2016_flickr.de.gz: no such test file; pass --data"):
        quality.reference_files(recipe, tmp_path / "run")
