"""Single-process no-ops, and two real gloo processes started the way torchrun starts them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from seq2seq.distributed import (
    DistContext,
    DistributedError,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    from_main,
    init_distributed,
    shutdown,
)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from seq2seq.distributed import (all_gather_object, all_reduce_sum, barrier,
        broadcast_object, from_main, init_distributed, shutdown)

    ctx = init_distributed("cpu")
    total = all_reduce_sum([float(ctx.rank + 1), 10.0])
    shared = from_main([float(ctx.rank + 7)])
    gathered = all_gather_object({"rank": ctx.rank})
    obj = broadcast_object({"from": ctx.rank, "items": [1, 2, 3]} if ctx.is_main else None)
    barrier()
    with open(sys.argv[1], "w") as handle:
        json.dump({"rank": ctx.rank, "world_size": ctx.world_size, "is_main": ctx.is_main,
                   "device": str(ctx.device), "total": total, "obj": obj, "shared": shared,
                   "gathered": gathered}, handle)
    shutdown()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_torchrun(monkeypatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(no_torchrun) -> None:
    ctx = init_distributed("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert ctx.is_main and not ctx.is_distributed
    assert not torch.distributed.is_initialized()
    assert all_reduce_sum([1.0, 2]) == [1.0, 2.0] and from_main([3]) == [3.0]
    assert all_gather_object("x") == ["x"]
    obj = {"a": 1}
    assert broadcast_object(obj) is obj
    barrier()
    shutdown()


def test_world_size_one_creates_no_group(no_torchrun, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = init_distributed("auto")
    assert ctx.world_size == 1 and not torch.distributed.is_initialized()


def test_bad_requests_are_clear(no_torchrun, monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'; use auto, cpu, cuda"):
        init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_distributed("cpu")


def test_one_device_rule_for_training_and_inference() -> None:
    from seq2seq.distributed import resolve_device
    from seq2seq.inference import InferenceError, load_model

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(DistributedError, match=f"unknown device '{bad}'"):
            resolve_device(bad)
        with pytest.raises(InferenceError, match=f"unknown device '{bad}'"):  # the same words
            load_model(Path(__file__), bad)


def test_more_processes_on_a_node_than_gpus_is_refused(no_torchrun, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")  # even the ranks that have a GPU refuse
    with pytest.raises(DistributedError, match="4 processes on this node but only 2 CUDA"):
        init_distributed("cuda")


def test_a_launch_without_torchrun_is_one_error_line_and_exit_2(no_torchrun, monkeypatch,
                                                                 tmp_path):
    from typer.testing import CliRunner

    from seq2seq.cli import app

    from .conftest import RECIPES

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, ["train", str(RECIPES / "toy_reverse.toml"), "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: WORLD_SIZE=2 but MASTER_ADDR")


def test_two_gloo_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{rank}.json")],
                                      env=env, stderr=subprocess.PIPE, text=True))
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["is_main"] for r in results] == [True, False]
    for result in results:
        assert result["world_size"] == 2 and result["device"] == "cpu"
        assert result["total"] == [3.0, 20.0]  # (0+1) + (1+1), 10 + 10
        assert result["obj"] == {"from": 0, "items": [1, 2, 3]}
        assert result["shared"] == [7.0]  # rank 0's value everywhere
        assert result["gathered"] == [{"rank": 0}, {"rank": 1}]
