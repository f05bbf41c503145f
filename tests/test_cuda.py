"""The CUDA paths: the same model, search and training code on a GPU as on the CPU.

Skipped where CUDA is not available (CI has no GPU); on a GPU machine run
``pytest tests/test_cuda.py``. TF32 is turned off so that GPU and CPU compute the same fp32
function and can be compared closely.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from seq2seq.cli import app
from seq2seq.config import ModelConfig
from seq2seq.data import read_parallel
from seq2seq.inference import load_model, translate_lines
from seq2seq.model import build_model
from seq2seq.model.attention import _AdditiveScores
from seq2seq.train import train

from .conftest import toy_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=16, hidden_size=32, encoder_layers=2, decoder_layers=2,
                         dropout=0.0)
    return build_model(config, 40, "translation").eval()


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = torch.tensor([7, 4, 6, 2])
    src = torch.randint(4, 40, (4, 7))
    for row, length in enumerate(lengths.tolist()):
        src[row, length:] = 0
    return src, lengths


def test_teacher_forced_logits_on_cuda_equal_the_cpu():
    model = small_model()
    src, lengths = source_batch()
    tgt = torch.randint(4, 40, (4, 5))
    with torch.no_grad():
        cpu = model(src, lengths, tgt)
        gpu = model.cuda()(src.cuda(), lengths.cuda(), tgt.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_two_stage_beam_top_k_on_cuda():
    from seq2seq.search import _top_k_of_groups

    torch.manual_seed(0)
    total = torch.randn(6 * 5, 8000, device="cuda").log_softmax(-1)
    values, indices = _top_k_of_groups(total, 5, 10)
    expected = total.view(6, 5 * 8000).topk(10, dim=1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_attention_scores_and_gradients_on_cuda():
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64, device="cuda", requires_grad=True)
               for shape in [(3, 4, 8), (3, 6, 8), (8,)])
    expected = torch.matmul(torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)), v)
    torch.testing.assert_close(_AdditiveScores.apply(q, k, v), expected)
    assert torch.autograd.gradcheck(_AdditiveScores.apply, (q, k, v), fast_mode=True)


@pytest.fixture(scope="module")
def cuda_toy_run(tmp_path_factory):
    """The toy reversal task trained on the GPU with the default precision (bf16 autocast)."""
    out = tmp_path_factory.mktemp("cuda_toy")
    train(toy_recipe("train.max_steps=450", "data.toy_train_size=2000", "train.device=cuda"), out)
    return out


def toy_pairs(run) -> list[tuple[str, str]]:
    recipe = load_model(run / "last.pt").recipe
    return read_parallel(recipe.data, "valid", seed=recipe.train.seed)


def test_bf16_training_on_cuda_learns_the_toy_task(cuda_toy_run):
    loaded = load_model(cuda_toy_run / "best.pt", device="cuda")
    assert next(loaded.model.parameters()).dtype == torch.float32  # master weights stay fp32
    pairs = toy_pairs(cuda_toy_run)
    outputs = translate_lines(loaded, [s for s, _ in pairs], loaded.recipe.decode)
    right = sum(loaded.tokenizer.decode(hyps[0].tokens) == target
                for (_, target), hyps in zip(pairs, outputs, strict=True))
    assert right >= 0.8 * len(pairs)


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_search_on_cuda_equals_the_cpu(cuda_toy_run, strategy):
    sources = [s for s, _ in toy_pairs(cuda_toy_run)]
    results = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(cuda_toy_run / "best.pt", device=device)
        config = replace(loaded.recipe.decode, beam_size=4, n_best=2 if strategy == "beam" else 1)
        results[device] = translate_lines(loaded, sources, config, strategy)
    same = 0
    for hyps_gpu, hyps_cpu in zip(results["cuda"], results["cpu"], strict=True):
        same += hyps_gpu[0].tokens == hyps_cpu[0].tokens
        scores_cpu = {tuple(h.tokens): h.score for h in hyps_cpu}
        for h in hyps_gpu:  # a hypothesis both found has the same score
            if tuple(h.tokens) in scores_cpu:
                assert h.score == pytest.approx(scores_cpu[tuple(h.tokens)], abs=1e-3)
    assert same >= 0.95 * len(sources)  # only near-ties may break differently


def test_translate_on_cuda_matches_the_cpu(cuda_toy_run, tmp_path):
    pairs = toy_pairs(cuda_toy_run)[:20]
    source = tmp_path / "in.txt"
    source.write_text("\n".join([pairs[0][0], ""] + [s for s, _ in pairs[1:]]) + "\n")
    runner = CliRunner()
    outputs = {}
    for device in ("cpu", "cuda"):
        target = tmp_path / f"{device}.txt"
        result = runner.invoke(app, ["translate", str(cuda_toy_run / "best.pt"), "--input",
                                     str(source), "--output", str(target), "--device", device])
        assert result.exit_code == 0, result.output
        outputs[device] = target.read_text(encoding="utf-8").splitlines()
    assert len(outputs["cuda"]) == 21 and outputs["cuda"][1] == ""
    same = sum(a == b for a, b in zip(outputs["cuda"], outputs["cpu"], strict=True))
    assert same >= 19  # fp32 on both; only near-ties may break differently


def test_int8_is_refused_on_cuda(cuda_toy_run):
    result = CliRunner().invoke(app, ["translate", str(cuda_toy_run / "best.pt"), "--device",
                                      "cuda", "--quantize", "int8"], input="1 2\n")
    assert result.exit_code == 2 and "CPU only" in result.output


def test_a_torchrun_group_of_one_runs_every_collective_through_nccl(tmp_path, monkeypatch):
    """torchrun with one process makes a real NCCL group of size 1, so training runs every
    collective of the loop (token counts, the non-finite vote, rank 0's clock, the shared
    validation, the RNG gather) through NCCL on one GPU; each tensor lands on the GPU."""
    import torch.distributed as tdist

    from seq2seq import distributed

    from .test_train import _free_port

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(name, value)
    seen: list[tuple[str, str]] = []
    for name in ("all_reduce", "broadcast"):
        real = getattr(tdist, name)

        def wrapper(tensor, *args, _real=real, **kwargs):
            seen.append((tdist.get_backend(), tensor.device.type))
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(tdist, name, wrapper)
    train(toy_recipe("train.max_steps=6", "train.valid_every=3", "train.device=cuda",
                     "model.hidden_size=32", "data.toy_valid_size=10"), tmp_path)
    assert seen and set(seen) == {("nccl", "cuda")}
    assert not tdist.is_initialized() and distributed.collective_device().type == "cpu"
