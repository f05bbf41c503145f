"""Checkpoint format: round trip, safe loading, atomic writes, clear errors, pruning, averaging."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from seq2seq import checkpoint
from seq2seq.checkpoint import (
    CheckpointError,
    average_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def make_payload(weight: torch.Tensor | None = None, step: int = 7) -> dict:
    """A payload with every key the format describes, all plain data."""
    weight = torch.arange(6, dtype=torch.float32).view(2, 3) if weight is None else weight
    return {
        "format": "seq2seq",
        "version": 1,
        "recipe": {"model": {"hidden_size": 8}, "train": {"lr": 1e-3}},
        "model": {"w": weight, "b": weight.sum(0).clone(), "count": torch.tensor([step])},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
        "scheduler": {"last_epoch": step},
        "rng": rng_state(),
        "step": step,
        "epoch": 1,
        "data_position": {"epoch": 1, "position": 3},
        "metrics": {"bleu": 12.5, "best": None, "ok": True},
        "tokenizer": {"kind": "char", "data": b"\x00\x01tokenizer bytes"},
        "vocab_size": 42,
    }


def test_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    payload = make_payload()
    save_checkpoint(path, payload)
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled objects
    assert raw["tokenizer"]["data"] == b"\x00\x01tokenizer bytes"
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert loaded["metrics"] == payload["metrics"]
    assert loaded["recipe"] == payload["recipe"]
    assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])
    assert loaded["rng"]["python"] == payload["rng"]["python"]


def test_atomic_write_leaves_only_the_target(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "last.pt", make_payload())
    save_checkpoint(tmp_path / "last.pt", make_payload(step=8))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, make_payload(step=1))

    def broken_save(obj, handle) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_payload(step=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "step_10.pt"
    save_checkpoint(path, make_payload(weight=torch.randn(64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, plain)  # loads fine, but is not ours
    with pytest.raises(CheckpointError, match="not a seq2seq checkpoint") as info:
        load_checkpoint(plain)
    assert str(plain) in str(info.value)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "seq2seq", "obj": Path("x")}, pickled)  # needs unsafe unpickling
    with pytest.raises(CheckpointError, match="not a seq2seq checkpoint"):
        load_checkpoint(pickled)

    text = tmp_path / "text.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(text)


def test_prune_keeps_newest_and_best_last(tmp_path: Path) -> None:
    for name in ["step_100.pt", "step_20.pt", "step_300.pt", "step_4000.pt", "best.pt",
                 "last.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_100.pt", "step_20.pt"]  # numeric order
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "last.pt", "notes.txt", "step_300.pt", "step_4000.pt"]
    prune_checkpoints(tmp_path, keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "notes.txt"]


def test_average_of_two_checkpoints(tmp_path: Path) -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([[3.0, 2.0, 0.0], [-4.0, 1.0, 7.0]])
    save_checkpoint(tmp_path / "a.pt", make_payload(a, step=1))
    save_checkpoint(tmp_path / "c.pt", make_payload(b, step=2))
    averaged = average_checkpoints([tmp_path / "a.pt", tmp_path / "c.pt"])
    expected = torch.tensor([[2.0, 2.0, 1.5], [0.0, 3.0, 6.5]])
    assert torch.equal(averaged["model"]["w"], expected)
    assert averaged["model"]["w"].dtype == torch.float32
    assert torch.equal(averaged["model"]["count"], torch.tensor([2]))  # ints: from the last
    assert averaged["step"] == 2 and averaged["format"] == "seq2seq"

    odd = make_payload(torch.zeros(3, 2))
    save_checkpoint(tmp_path / "odd.pt", odd)
    with pytest.raises(CheckpointError, match="odd.pt"):
        average_checkpoints([tmp_path / "odd.pt", tmp_path / "a.pt"])


def test_rng_round_trip_reproduces_sequences(tmp_path: Path) -> None:
    torch.manual_seed(123)
    random.seed(123)
    save_checkpoint(tmp_path / "rng.pt", {"format": "seq2seq", "rng": rng_state()})
    expected_torch, expected_py = torch.rand(5), [random.random() for _ in range(5)]
    torch.rand(100)  # move both generators on
    random.random()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(5), expected_torch)
    assert [random.random() for _ in range(5)] == expected_py
