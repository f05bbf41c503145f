"""Two gloo processes training for real: decisions are shared, so every rank stops together and
steps with the same learning rate; resume and the character LM work under DDP; and no
collective is ever handed a tensor on a device its backend would refuse."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import distributed
from seq2seq.checkpoint import load_checkpoint
from seq2seq.train import train

from .conftest import RECIPES, TOY_SETTINGS, lm_recipe
from .test_train import _free_port, assert_same_weights

PACKAGE = Path(__file__).resolve().parents[1] / "seq2seq"

# Runs ``seq2seq train`` in one rank, recording what the test checks in RECORD_DIR/rank<r>.json:
# the device of every tensor handed to a torch.distributed collective (it must be the device
# distributed.collective_device() picks for the backend), the learning rate of every step, the
# RNG seed after the model is built, and a checksum of the final parameters.
PEAK_PER_PROCESS = 1e12  # what the workers' matmul probe reports
WORKER = f"PEAK_PER_PROCESS = {PEAK_PER_PROCESS!r}\n" + """
import hashlib, json, os, sys
import torch
import torch.distributed as tdist
from seq2seq import distributed, train
from seq2seq.cli import main

rank, out = int(os.environ["RANK"]), os.environ["RECORD_DIR"]
record = {"devices": [], "lrs": [], "bad_devices": []}

def checked(function):
    def wrapper(tensor, *args, **kwargs):
        expected = distributed.collective_device()
        record["devices"].append(str(tensor.device))
        if tensor.device != expected:
            record["bad_devices"].append([function.__name__, str(tensor.device), str(expected)])
        return function(tensor, *args, **kwargs)
    return wrapper

for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor"):
    setattr(tdist, name, checked(getattr(tdist, name)))

real_init, real_update, real_run = train.Trainer.__init__, train.Trainer._update, train.Trainer.run
train.matmul_peak_flops = lambda device: PEAK_PER_PROCESS

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    record["seed"] = torch.initial_seed()

def update(self, totals):
    stats = real_update(self, totals)
    record["lrs"].append(stats["lr"])
    return stats

def run(self):
    metrics = real_run(self)
    digest = hashlib.sha256()
    for tensor in self.model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    record.update(checksum=digest.hexdigest(), step=self.progress.step, backend=tdist.get_backend(),
                  flops_per_token=self.model.flops_per_token())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    return metrics

train.Trainer.__init__, train.Trainer._update, train.Trainer.run = init, update, run
sys.argv = ["seq2seq", *sys.argv[1:]]
main()
"""


def run_ddp(tmp_path: Path, recipe: Path, out: Path, *settings: str,
            resume: bool = False) -> list[dict]:
    """Train with two gloo processes started as torchrun starts them; the ranks' records."""
    record = tmp_path / f"record-{out.name}"
    record.mkdir(exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "RECORD_DIR": str(record)}
    command = [sys.executable, "-c", WORKER, "train", str(recipe), "--out", str(out)]
    command += [item for setting in settings for item in ("--set", setting)]
    command += ["--resume"] if resume else []
    workers = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for r in range(2)]
    try:
        for worker in workers:
            assert worker.wait(timeout=240) == 0, worker.stderr.read().decode()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    records = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    for r in records:
        assert r["backend"] == "gloo" and r["devices"] and not r["bad_devices"], r["bad_devices"]
    return records


TOY = RECIPES / "toy_reverse.toml"
SMALL = (*TOY_SETTINGS, "model.hidden_size=16", "model.embed_dim=16", "train.threads=1",
         "data.toy_train_size=300", "train.max_tokens=300", "data.toy_valid_size=10")


@pytest.mark.slow
def test_patience_stops_every_rank_together(tmp_path):
    """The issue's reproduction (with lr 0): rank 0's count of bad validations decides for both
    ranks, and both leave the loop after the same validation."""
    records = run_ddp(tmp_path, TOY, tmp_path / "run", *SMALL, "train.patience=1",
                      "train.valid_every=5", "train.lr=0", "train.max_steps=1000",
                      "train.valid_metric=loss", "train.warmup_steps=1")
    assert records[0]["step"] == records[1]["step"] == 10  # best at 5, no better at 10
    assert records[0]["checksum"] == records[1]["checksum"]
    # tokens/s counts both ranks' tokens, so MFU is against both ranks' peak
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [event for event in events if event["event"] == "train"]
    assert logged
    for event in logged:
        expected = records[0]["flops_per_token"] * event["tokens_per_s"] / (2 * PEAK_PER_PROCESS)
        assert event["mfu"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_a_time_budget_keeps_the_ranks_identical_with_the_char_lm(tmp_path, lm_text):
    """max_minutes with the gnmt schedule: rank 0's clock sets the budget fraction, so both ranks
    step with the same learning rates (halvings included) and end with the same parameters."""
    settings = [f"data.text={lm_text}", "model.embed_dim=16", "model.hidden_size=32",
                "model.decoder_layers=2", "model.dropout=0.1", "train.batch_size=2",
                "train.bptt=16", "train.max_steps=0", "train.max_minutes=0.05",
                "train.warmup_steps=1", "train.decay_start=0.2", "train.threads=1",
                "train.valid_every=100000", "train.log_every=1000"]
    records = run_ddp(tmp_path, RECIPES / "tinyshakespeare_char.toml", tmp_path / "lm",
                      *settings)
    assert records[0]["lrs"] == records[1]["lrs"] and len(set(records[0]["lrs"])) >= 3
    assert records[0]["checksum"] == records[1]["checksum"]
    assert [r["seed"] for r in records] == [1, 2]  # train.seed + rank: different dropout


@pytest.mark.slow
def test_the_char_lm_under_ddp_equals_one_process_with_both_ranks_rows(tmp_path, lm_text):
    settings = ("model.dropout=0", "train.max_steps=5", "train.threads=1")
    run_ddp(tmp_path, RECIPES / "tinyshakespeare_char.toml", tmp_path / "ddp",
            *lm_recipe_settings(lm_text), *settings)
    train(lm_recipe(lm_text, *settings, "train.batch_size=8"), tmp_path / "one")
    ddp, one = (load_checkpoint(tmp_path / name / "last.pt") for name in ("ddp", "one"))
    for name, tensor in one["model"].items():
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-5)


def lm_recipe_settings(lm_text: Path) -> list[str]:
    """lm_recipe's overrides as --set strings (batch_size 4 per rank: 8 rows in all)."""
    return [f"data.text={lm_text}", "model.embed_dim=16", "model.hidden_size=32",
            "model.decoder_layers=2", "train.batch_size=4", "train.bptt=16",
            "train.max_minutes=0", "train.log_every=5", "train.valid_every=1000",
            "train.keep_last=1"]


@pytest.mark.slow
def test_resuming_a_ddp_run_equals_the_uninterrupted_run(tmp_path):
    """With dropout: each rank's own RNG is checkpointed and restored, so the resumed run draws
    the masks the uninterrupted one drew."""
    settings = (*SMALL, "model.dropout=0.2", "train.valid_every=1000", "train.keep_last=2")
    run_ddp(tmp_path, TOY, tmp_path / "full", *settings, "train.max_steps=8",
            "train.save_every=4")
    half = tmp_path / "half"
    half.mkdir()
    for name in ("recipe.toml", "tokenizer.char"):
        (half / name).write_bytes((tmp_path / "full" / name).read_bytes())
    (half / "last.pt").write_bytes((tmp_path / "full" / "step_4.pt").read_bytes())
    assert len(load_checkpoint(half / "last.pt")["rng_ranks"]) == 2
    run_ddp(tmp_path, TOY, half, *settings, "train.max_steps=8", "train.save_every=4",
            resume=True)
    assert_same_weights(tmp_path / "full" / "last.pt", half / "last.pt")


def test_collectives_pick_the_device_their_backend_accepts(monkeypatch):
    monkeypatch.setattr(distributed, "_active", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_only_the_distributed_module_calls_torch_distributed():
    """So every collective goes through helpers that make their tensors on the right device."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("torch.distributed") for n in names), path
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), path
