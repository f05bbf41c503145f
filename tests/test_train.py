"""Training: the toy task is learned, checkpoints round-trip, resume is exact, DDP equals one
process, and bad situations (non-finite losses, killed processes) are survived or reported."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from seq2seq import distributed as dist
from seq2seq.checkpoint import CheckpointError, load_checkpoint
from seq2seq.config import ModelConfig, TrainConfig, load_recipe
from seq2seq.data import TokenBatchSampler, collate, encode_pairs, read_parallel
from seq2seq.inference import best_text, load_model, translate_lines
from seq2seq.model import build_model
from seq2seq.model import loss as loss_module
from seq2seq.model.loss import token_losses
from seq2seq.tasks import make_task
from seq2seq.tokenizer import PAD, load_tokenizer, train_tokenizer
from seq2seq.train import Trainer, TrainingError, budget_fraction, learning_rate, train

from .conftest import RECIPES, TOY_SETTINGS, lm_recipe, toy_recipe

SINGLE = dist.DistContext(0, 1, 0, torch.device("cpu"))


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                                strict=True):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])


def test_epoch_budget_drives_the_schedule():
    """An epochs-only budget (the WMT16 recipe) still decays: steps / (epochs x steps/epoch)."""
    config = TrainConfig(max_epochs=6, max_steps=0, max_minutes=0.0, decay_start=0.5)
    assert budget_fraction(config, 300, 0.0, steps_per_epoch=100) == 0.5
    assert budget_fraction(config, 450, 0.0, steps_per_epoch=100) == 0.75
    assert learning_rate(config, 450, 0.75) < config.lr
    assert budget_fraction(config, 450, 0.0) == 0.0  # epoch length unknown: no decay
    mixed = TrainConfig(max_epochs=2, max_steps=1000, max_minutes=1.0)
    assert budget_fraction(mixed, 100, 45.0, steps_per_epoch=100) == 0.75  # the clock leads


def test_gnmt_schedule_by_hand():
    config = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, decay_start=0.5, decay_halvings=4)
    assert learning_rate(config, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(config, 9, 0.09) == pytest.approx(1.0)
    assert learning_rate(config, 50, 0.50) == 1.0
    assert learning_rate(config, 51, 0.51) == 0.5  # first of four halvings over the last half
    assert learning_rate(config, 70, 0.70) == 0.25
    assert learning_rate(config, 99, 0.99) == 0.0625
    # warm-up also ends at warmup_fraction of the budget: a slow machine's 20 steps reach 10%
    by_fraction = dataclasses.replace(config, warmup_steps=100, warmup_fraction=0.1)
    assert learning_rate(by_fraction, 0, 0.0) == pytest.approx(0.01)
    assert learning_rate(by_fraction, 4, 0.05) == pytest.approx(0.5)  # the budget leads
    assert learning_rate(by_fraction, 19, 0.1) == 1.0
    assert learning_rate(by_fraction, 60, 0.02) == pytest.approx(0.61)  # the steps lead
    inverse = TrainConfig(lr=1.0, warmup_steps=4, schedule="inverse_sqrt")
    assert learning_rate(inverse, 15, 0.0) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_loss_equals_cross_entropy_in_value_and_gradient(smoothing):
    """The one-pass label-smoothed loss against torch's cross_entropy, PAD rows ignored."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 4).requires_grad_()
    target = torch.randint(1, 50, (3, 7))
    target[0, 4:] = PAD
    target[2, :] = PAD  # a row of padding only
    loss, nll = token_losses(logits, target, smoothing)
    loss.backward()
    ours = logits.grad.clone()
    logits.grad = None
    flat = logits.reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=PAD,
                                                 reduction="sum", label_smoothing=smoothing)
    expected.backward()
    plain = torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=PAD,
                                              reduction="sum")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, plain.detach())
    torch.testing.assert_close(ours, logits.grad)
    assert not nll.requires_grad and not ours[2].any()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [1 << 21, 64 * 56])  # one block; six blocks of 64
def test_classifier_losses_equal_the_loss_of_the_logits(smoothing, block_elements, monkeypatch):
    """The classifier fused with the loss, blockwise, over weight rows padded past ``columns``:
    the loss, NLL and gradients of x, weight and bias that ``token_losses`` gives on the
    logits of the first ``columns`` rows; the padding rows get zero gradient; without autograd
    the same values."""
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    columns, rows, width, n = 50, 56, 16, 333
    x = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(rows, width).requires_grad_()
    bias = torch.randn(rows).requires_grad_()
    target = torch.randint(1, columns, (n,))
    target[::5] = PAD
    loss, nll = loss_module.classifier_losses(x, weight, bias, target, smoothing, columns)
    (loss * 0.5).backward()
    ours = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    logits = torch.nn.functional.linear(x, weight[:columns], bias[:columns])
    expected, expected_nll = token_losses(logits, target, smoothing)
    (expected * 0.5).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected_nll)
    for got, want in zip(ours, (x.grad, weight.grad, bias.grad), strict=True):
        torch.testing.assert_close(got, want)
    assert not nll.requires_grad
    assert not ours[1][columns:].any() and not ours[2][columns:].any()
    with torch.no_grad():
        again = loss_module.classifier_losses(x, weight, bias, target, smoothing, columns)
    torch.testing.assert_close(again, (loss.detach(), nll))
    with pytest.raises(ValueError, match="columns must be in 1..56"):
        loss_module.classifier_losses(x, weight, bias, target, smoothing, 57)


def test_model_losses_equal_the_loss_of_its_logits():
    """``Seq2Seq.forward(..., targets=)`` (the fused path on CPU) against ``token_losses`` on
    the model's logits, with a target vocabulary whose size is not a multiple of 8: the same
    loss and the same gradients of every parameter."""
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=16, hidden_size=16, encoder_layers=2, decoder_layers=2,
                         dropout=0.0, target_vocabulary=True)
    model = build_model(config, 40, "translation")
    model.output.restrict(torch.arange(4, 31))  # 31 columns with the specials
    src = torch.randint(4, 40, (3, 6))
    tgt_in, tgt_out = torch.randint(4, 31, (3, 5)), torch.randint(4, 31, (3, 5))
    tgt_out[2, 3:] = PAD
    lengths = torch.tensor([6, 6, 6])
    columns = model.output.positions(tgt_out)
    loss, nll = model(src, lengths, tgt_in, targets=columns, smoothing=0.1)
    loss.backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected, expected_nll = token_losses(model(src, lengths, tgt_in), columns, 0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected_nll)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)


def test_toy_reversal_is_learned(toy_run):
    loaded = load_model(toy_run / "best.pt")
    pairs = read_parallel(loaded.recipe.data, "valid", seed=loaded.recipe.train.seed)
    outputs = translate_lines(loaded, [s for s, _ in pairs], loaded.recipe.decode)
    texts = [best_text(loaded.tokenizer, h) for h in outputs]
    correct = sum(text == target for text, (_, target) in zip(texts, pairs, strict=True))
    assert correct / len(pairs) >= 0.9


def test_checkpoint_reproduces_the_validation_it_recorded(toy_run):
    payload = load_checkpoint(toy_run / "last.pt")
    loaded = load_model(toy_run / "last.pt")
    task = make_task(loaded.recipe, SINGLE)
    task.encode(loaded.tokenizer, toy_run / "corpus")
    assert task.validate(loaded.model, loaded.recipe) == payload["metrics"]
    for name in ("recipe.toml", "best.pt", "last.pt", "metrics.jsonl", "train.log"):
        assert (toy_run / name).exists(), name


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_equals_uninterrupted_training(tmp_path, accumulate):
    settings = ["model.dropout=0.2", "model.hidden_size=32", "train.schedule=constant",
                f"train.accumulate={accumulate}", "data.toy_train_size=200", "train.max_tokens=300"]
    train(toy_recipe(*settings, "train.max_steps=16"), tmp_path / "straight")
    train(toy_recipe(*settings, "train.max_steps=8"), tmp_path / "resumed")
    train(toy_recipe(*settings, "train.max_steps=16"), tmp_path / "resumed", resume=True)
    assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "resumed" / "last.pt")


def test_lm_resume_equals_uninterrupted_training(tmp_path, lm_text):
    train(lm_recipe(lm_text, "train.max_steps=12", "train.schedule=constant"), tmp_path / "a")
    train(lm_recipe(lm_text, "train.max_steps=5", "train.schedule=constant"), tmp_path / "b")
    train(lm_recipe(lm_text, "train.max_steps=12", "train.schedule=constant"), tmp_path / "b",
          resume=True)
    assert_same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


class Interrupted(Exception):
    """Stands for a process that dies right after a checkpoint."""


def test_resume_with_the_gnmt_schedule_and_a_validation_equals_uninterrupted_training(
        tmp_path, monkeypatch):
    """The recipes' schedule (warm-up, then halvings over the second half of a step budget),
    stopped after the save of step 8 and resumed: validations at 5, 10, 15 and the end, and the
    halvings all fall on both sides of the stop. Every update, learning rate and validation
    equals the uninterrupted run's."""
    settings = ["model.dropout=0.2", "model.hidden_size=32", "train.schedule=gnmt",
                "train.warmup_steps=4", "train.decay_start=0.5", "train.decay_halvings=4",
                "train.max_steps=16", "train.max_minutes=0", "train.valid_every=5",
                "train.save_every=4", "train.log_every=1", "data.toy_train_size=200",
                "data.toy_valid_size=10", "train.max_tokens=300"]
    train(toy_recipe(*settings), tmp_path / "straight")
    original = Trainer.save

    def save_then_die(self, is_best):
        original(self, is_best)
        if self.progress.step == 8:
            raise Interrupted

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Interrupted):
        train(toy_recipe(*settings), tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "save", original)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 8
    train(toy_recipe(*settings), tmp_path / "resumed", resume=True)

    assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "resumed" / "last.pt")
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt")
                         for run in ("straight", "resumed"))
    assert (straight["best"], straight["metrics"]) == (resumed["best"], resumed["metrics"])
    rates = [(e["step"], e["lr"]) for e in read_events(tmp_path / "straight", "train")]
    assert rates == [(e["step"], e["lr"]) for e in read_events(tmp_path / "resumed", "train")]
    peak = max(lr for _, lr in rates)
    assert rates[0][1] < peak and rates[-1][1] <= peak / 8  # warmed up, then halved 3+ times
    assert len({lr for step, lr in rates if step > 8 and lr < peak}) >= 2  # halved after step 8
    valid = read_events(tmp_path / "straight", "valid")
    assert [e["step"] for e in valid] == [5, 10, 15, 16]
    assert read_events(tmp_path / "resumed", "valid") == valid


# The toy task with two-letter symbols and a SentencePiece model: words have several segmentations.
SUBWORD = ("tokenizer.kind=sentencepiece", "tokenizer.vocab_size=100", "data.toy_vocab=40",
           "data.toy_train_size=200", "train.max_tokens=300")


SHARED_CACHE = Path(tempfile.mkdtemp(prefix="corpus"))  # rank 0's entries, read by other ranks
atexit.register(shutil.rmtree, SHARED_CACHE, True)


def _encoded_task(recipe, ctx=SINGLE, tokenizer=None):
    task = make_task(recipe, ctx)
    tokenizer = tokenizer or train_tokenizer(task.tokenizer_texts(), recipe.tokenizer)
    task.encode(tokenizer, SHARED_CACHE)
    return task, tokenizer


def test_without_subword_sampling_the_batches_are_unchanged():
    """alpha = 0: the batches of the best segmentation, epoch after epoch, as before sampling."""
    recipe = toy_recipe(*SUBWORD)
    task, tokenizer = _encoded_task(recipe)
    steps = 2 * task.steps_per_epoch + 3
    got = [task.next_step()[0] for _ in range(steps)]
    pairs = read_parallel(recipe.data, "train", recipe.train.seed)
    encoded = encode_pairs(pairs, tokenizer, recipe.data.max_length)
    sampler = TokenBatchSampler(encoded.src_lengths, encoded.tgt_lengths, recipe.train.max_tokens,
                                seed=recipe.train.seed)
    expected: list[list[int]] = []
    while len(expected) < steps:
        expected += list(sampler)
    for batch, indices in zip(got, expected, strict=False):
        assert torch.equal(batch.src, collate(encoded, indices).src)
        assert torch.equal(batch.tgt_out, collate(encoded, indices).tgt_out)
    sampled, _ = _encoded_task(toy_recipe(*SUBWORD, "tokenizer.sampling_alpha=0.3"), SINGLE,
                               tokenizer)
    assert any(not torch.equal(sampled.next_step()[0].src, batch.src) for batch in got[:5])


def test_subword_sampling_is_per_epoch_and_the_same_on_every_rank():
    recipe = toy_recipe(*SUBWORD, "tokenizer.sampling_alpha=0.3")
    ranks = [dist.DistContext(rank, 2, rank, torch.device("cpu")) for rank in range(2)]
    first, tokenizer = _encoded_task(recipe, ranks[0])
    tasks = [first, _encoded_task(recipe, ranks[1], tokenizer)[0]]
    segmentations = []
    for epoch in range(2):
        batches = [task.next_step()[0] for task in tasks]  # the first step samples the epoch
        assert tasks[0].train == tasks[1].train
        for _ in range(tasks[0].steps_per_epoch - 1):
            batches += [task.next_step()[0] for task in tasks]
        assert [task.epoch for task in tasks] == [epoch + 1] * 2
        # Together the ranks saw every example of this epoch's segmentation once.
        assert sum(b.num_tgt_tokens for b in batches) == sum(len(y) + 1 for y in tasks[0].train.tgt)
        segmentations.append(tasks[0].train)
    best = first.best_train
    assert segmentations[0].kept.tolist() == segmentations[1].kept.tolist() == best.kept.tolist()
    assert segmentations[0].tgt != segmentations[1].tgt != best.tgt
    again, _ = _encoded_task(recipe, ranks[0], tokenizer)  # a second run with the same seed
    again.next_step()
    assert again.train == segmentations[0]


def test_subword_sampling_resume_equals_uninterrupted_training(tmp_path):
    """Stopped inside the second epoch, the resumed run re-samples that epoch's segmentation,
    continues at the same batch and crosses into the third epoch like the uninterrupted run."""
    settings = [*SUBWORD, "tokenizer.sampling_alpha=0.3", "model.dropout=0.2",
                "model.hidden_size=32", "train.schedule=constant"]
    train(toy_recipe(*settings, "train.max_steps=25"), tmp_path / "straight")
    train(toy_recipe(*settings, "train.max_steps=14"), tmp_path / "resumed")
    stopped = load_checkpoint(tmp_path / "resumed" / "last.pt")["data_position"]["sampler"]
    assert stopped["epoch"] == 1 and stopped["position"] > 0
    train(toy_recipe(*settings, "train.max_steps=25"), tmp_path / "resumed", resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert straight["data_position"]["sampler"]["epoch"] == 2
    assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "resumed" / "last.pt")


def test_existing_run_and_missing_resume_are_clear_errors(tmp_path, lm_run, lm_text):
    with pytest.raises(TrainingError, match="already holds a run"):
        train(lm_recipe(lm_text, "train.max_steps=1"), lm_run)
    # said before any data is read: this recipe's corpus does not exist
    missing = lm_recipe(tmp_path / "no-such-text.txt", "train.max_steps=1")
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(missing, tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()  # and nothing was written


def test_nonfinite_losses_skip_updates_then_stop(tmp_path, monkeypatch):
    recipe = toy_recipe("train.max_steps=50", "train.max_nonfinite=3", "model.hidden_size=16")
    task = make_task(recipe, SINGLE)
    tokenizer = train_tokenizer(task.tokenizer_texts(), recipe.tokenizer)
    task.encode(tokenizer, tmp_path / "corpus")
    trainer = Trainer(recipe, tmp_path, SINGLE, task, tokenizer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = task.loss
    monkeypatch.setattr(task, "loss", lambda *a: tuple(x * float("nan") for x in original(*a)))
    for _ in range(2):
        trainer.train_step(task.next_step())
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        trainer.train_step(task.next_step())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_command(out: Path, *settings: str) -> list[str]:
    command = [sys.executable, "-m", "seq2seq", "train", str(RECIPES / "toy_reverse.toml"),
               "--out", str(out)]
    for setting in (*TOY_SETTINGS, *settings):
        command += ["--set", setting]
    return command


DDP_SETTINGS = ("model.dropout=0", "model.hidden_size=32", "train.max_steps=6", "train.threads=1",
                "data.toy_train_size=300", "train.max_tokens=400", "train.valid_every=1000")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    command = _train_command(tmp_path / "ddp", *DDP_SETTINGS)
    workers = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for r in range(2)]
    for worker in workers:
        assert worker.wait(timeout=240) == 0, worker.stderr.read().decode()
    train(toy_recipe(*DDP_SETTINGS, "train.accumulate=2"), tmp_path / "one")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    # Same batches and the same normalisation; only the order of floating-point sums differs.
    for name, tensor in one["model"].items():
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-5)


# Runs ``seq2seq`` with a hook in the atomic write: the second save of last.pt writes half of
# the new file and the process SIGKILLs itself before the rename, as a kill mid-save would.
DIE_IN_SAVE = """
import contextlib, os, signal, sys
from pathlib import Path
from seq2seq import checkpoint
from seq2seq.cli import main

real_atomic_write = checkpoint.atomic_write
saves = []

@contextlib.contextmanager
def dying_atomic_write(path, *args, **kwargs):
    with real_atomic_write(path, *args, **kwargs) as handle:
        yield handle
        if Path(path).name == "last.pt":
            saves.append(path)
            if len(saves) == 2:
                handle.flush()
                handle.truncate(handle.tell() // 2)
                handle.flush()
                os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

checkpoint.atomic_write = dying_atomic_write
main()
"""


def test_a_kill_during_a_save_leaves_the_last_good_checkpoint_which_resumes(tmp_path):
    out = tmp_path / "killed"
    settings = ("model.hidden_size=16", "train.max_steps=1000", "train.valid_every=5",
                "data.toy_valid_size=10")
    command = [sys.executable, "-c", DIE_IN_SAVE, *_train_command(out, *settings)[3:]]
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             timeout=240)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
    # the kill landed in the save of step 10: its half-written file is there, unusable
    [torn] = out.glob(".last.pt.*.tmp")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(torn)
    assert load_checkpoint(out / "last.pt")["step"] == 5  # the last good checkpoint survived
    train(toy_recipe(*settings[:1], "train.max_steps=8", "train.valid_every=5",
                     "data.toy_valid_size=10"), out, resume=True)
    assert load_checkpoint(out / "last.pt")["step"] == 8


def test_patience_stops_when_validation_stops_improving(tmp_path):
    # lr = 0: the first validation sets the best, the next two cannot beat it.
    recipe = toy_recipe("train.lr=0", "train.warmup_steps=1", "train.max_steps=1000",
                        "train.valid_every=2", "train.patience=2", "model.hidden_size=16",
                        "train.valid_metric=loss")
    train(recipe, tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 6


def test_wmt16_gnmt_recipe_builds_and_steps_on_a_local_copy(tmp_path, hf_offline):
    """The GNMT v2 recipe as shipped (4+4 layers, hf wmt16 de-en, nested translation rows), shrunk
    in width only, reads a local copy through datasets and takes optimizer steps."""
    shipped = load_recipe(RECIPES / "wmt16_en_de_gnmt.toml")
    assert (shipped.data.hf_dataset, shipped.data.hf_config) == ("wmt16", "de-en")
    assert (shipped.model.encoder_layers, shipped.model.decoder_layers) == (4, 4)
    assert (shipped.model.hidden_size, shipped.tokenizer.vocab_size) == (1024, 32000)
    train_config = shipped.train
    assert (train_config.lr, train_config.decay_halvings, train_config.max_epochs) == (2e-3, 4, 6)
    assert shipped.train.label_smoothing == 0.1
    assert (shipped.decode.beam_size, shipped.decode.length_penalty,
            shipped.decode.coverage_penalty) == (5, 0.6, 0.1)
    english = ["a dog runs across the meadow", "two men are playing football",
               "a woman reads a book", "children play in the sand"]
    german = ["ein Hund läuft über die Wiese", "zwei Männer spielen Fußball",
              "eine Frau liest ein Buch", "Kinder spielen im Sand"]
    folder = tmp_path / "wmt16"
    folder.mkdir()
    for split, n in (("train", 40), ("validation", 4), ("test", 4)):
        rows = [{"translation": {"de": german[i % 4], "en": english[i % 4]}} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                               encoding="utf-8")
    recipe = load_recipe(RECIPES / "wmt16_en_de_gnmt.toml", [
        f"data.root={tmp_path}", "data.hf_config=", "tokenizer.vocab_size=60",
        "model.embed_dim=16", "model.hidden_size=16", "train.max_epochs=0", "train.max_steps=3",
        "train.max_tokens=300", "train.log_every=1", "train.valid_every=3"])
    train(recipe, tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["step"] == 3
    model = load_model(tmp_path / "run" / "last.pt").model
    assert len(model.encoder_upper.layers) == len(model.decoder_upper.layers) == 3


def read_events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == kind]


def test_train_event_reports_the_token_weighted_mean_of_its_interval(tmp_path, monkeypatch):
    steps: list[dict[str, float]] = []
    original = Trainer.train_step

    def recording(self, micro_batches):
        steps.append(original(self, micro_batches))
        return steps[-1]

    monkeypatch.setattr(Trainer, "train_step", recording)
    train(toy_recipe("model.hidden_size=16", "train.max_steps=8", "train.log_every=4"), tmp_path)
    logged = read_events(tmp_path, "train")
    assert [event["step"] for event in logged] == [4, 8]
    for event, interval in zip(logged, (steps[:4], steps[4:]), strict=True):
        tokens = [step["target_tokens"] for step in interval]
        assert len(set(tokens)) > 1  # length buckets: batches of different sizes
        for key in ("loss", "nll"):
            mean = sum(step[key] * step["target_tokens"] for step in interval) / sum(tokens)
            assert event[key] == pytest.approx(mean, rel=1e-12)
            assert interval[-1][key] != pytest.approx(mean, rel=1e-6)  # not the last batch's
            plain = sum(step[key] for step in interval) / len(interval)
            assert plain != pytest.approx(mean, rel=1e-6)  # weighted by tokens, not by steps
        assert event["grad_norm"] == pytest.approx(sum(s["grad_norm"] for s in interval) / 4)
        assert event["lr"] == interval[-1]["lr"]


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(toy_recipe("model.hidden_size=16", "train.max_steps=4", "train.log_every=2",
                     "train.valid_every=4", "train.tensorboard=true"), tmp_path)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    for kind, key in (("train", "loss"), ("train", "nll"), ("train", "lr"), ("valid", "loss"),
                      ("valid", "bleu")):
        expected = [(e["step"], torch.tensor(e[key]).item()) for e in read_events(tmp_path, kind)]
        assert expected, (kind, key)
        written = [(scalar.step, scalar.value) for scalar in accumulator.Scalars(f"{kind}/{key}")]
        assert written == expected, (kind, key)  # TensorBoard keeps float32


def test_warm_start_takes_weights_and_tokenizer_and_restarts_the_schedule(toy_run, tmp_path,
                                                                          monkeypatch):
    source = load_checkpoint(toy_run / "last.pt")
    start: dict = {}
    original = Trainer.run

    def spy(self):
        start.update(weights={k: v.clone() for k, v in self.model.state_dict().items()},
                     step=self.progress.step, optimizer=self.optimizer.state_dict()["state"])
        return original(self)

    monkeypatch.setattr(Trainer, "run", spy)
    # Fewer symbols: a tokenizer trained on this data would differ, yet fit the same shapes.
    recipe = toy_recipe("data.toy_vocab=6", "train.max_steps=2", "train.log_every=1")
    fresh = train_tokenizer(make_task(recipe, SINGLE).tokenizer_texts(), recipe.tokenizer)
    assert fresh.to_bytes() != source["tokenizer"]["data"]
    train(recipe, tmp_path, init_from=toy_run / "last.pt")
    assert source["step"] > 2 and start["step"] == 0 and start["optimizer"] == {}
    assert start["weights"].keys() == source["model"].keys()
    for name, tensor in source["model"].items():
        assert torch.equal(start["weights"][name], tensor), name
    assert load_tokenizer(tmp_path).to_bytes() == source["tokenizer"]["data"]
    result = load_checkpoint(tmp_path / "last.pt")
    assert result["step"] == 2 and result["tokenizer"] == source["tokenizer"]
    assert read_events(tmp_path, "train")[0]["lr"] == learning_rate(recipe.train, 0, 0.0)


def test_init_from_with_resume_is_refused(toy_run, tmp_path):
    with pytest.raises(TrainingError, match="--init-from .* cannot be combined with --resume"):
        train(toy_recipe(), tmp_path, resume=True, init_from=toy_run / "last.pt")


def test_target_vocabulary_is_the_training_targets_ids_and_survives_the_checkpoint(tmp_path):
    """model.target_vocabulary: the classifier keeps the ids of the training targets (plus the
    special ids), not the source side's; the checkpoint carries them and decoding emits nothing
    else. Sources are lowercase words, targets the same words in uppercase."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefgh", k=rng.randint(2, 4))) for _ in range(30)]
    for name, count in (("train.tsv", 300), ("valid.tsv", 20)):
        rows = [" ".join(rng.choices(words, k=rng.randint(2, 5))) for _ in range(count)]
        (tmp_path / name).write_text("".join(f"{r}\t{r.upper()}\n" for r in rows))
    recipe = toy_recipe("data.format=tsv", f"data.root={tmp_path}", "data.train=train.tsv",
                        "data.valid=valid.tsv", "data.test=valid.tsv",
                        "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=60",
                        "model.target_vocabulary=true", "train.max_steps=30")
    task, tokenizer = _encoded_task(recipe)
    seen = sorted({i for ids in task.train.tgt for i in ids} | {3})
    assert task.output_vocabulary().tolist() == seen
    assert set(tokenizer.encode("abcdefgh")) - set(seen)  # lowercase pieces are no targets
    train(recipe, tmp_path / "run")
    loaded = load_model(tmp_path / "run" / "last.pt")
    kept = loaded.model.output.target_ids().tolist()
    assert kept == sorted(set(seen) | {0, 1, 2, 3})
    hyps = translate_lines(loaded, [s for s, _ in task.valid_pairs], recipe.decode)
    assert all(set(h[0].tokens) <= set(kept) for h in hyps)
