"""Ensembles, whole-sentence translation and interactive streaming of ``translate``."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from seq2seq.cli import app
from seq2seq.ensemble import Ensemble, EnsembleState
from seq2seq.inference import (
    encode_source,
    load_model,
    load_models,
    read_batches,
    translate_ids,
    translate_lines,
)
from seq2seq.tokenizer import EOS

from .test_cli import assert_user_error, toy_valid

runner = CliRunner()


def hypotheses(results):
    return [[(h.tokens, h.log_prob, h.score) for h in hyps] for hyps in results]


def test_an_ensemble_of_a_model_with_itself_is_the_model(toy_run):
    sources = [s for s, _ in toy_valid(toy_run)][:30]
    single = load_model(toy_run / "best.pt")
    pair = load_models([toy_run / "best.pt", toy_run / "best.pt"])
    assert isinstance(pair.model, Ensemble)
    config = replace(single.recipe.decode, beam_size=4, n_best=3, coverage_penalty=0.2)
    expected = hypotheses(translate_lines(single, sources, config))
    assert hypotheses(translate_lines(pair, sources, config)) == expected  # tokens and scores
    greedy = translate_lines(single, sources, config, "greedy")
    assert hypotheses(translate_lines(pair, sources, config, "greedy")) == hypotheses(greedy)


def test_ensemble_averages_log_probs_over_the_union_of_target_columns():
    class Member(torch.nn.Module):
        """Fixed log-probs over its columns (ids), a state that only counts steps."""

        def __init__(self, ids, values):
            super().__init__()
            self.vocab_size, self.ids = 8, ids
            self.values = torch.tensor(values)

        def output_ids(self):
            return self.ids

        def start(self, src, src_lengths):
            return Counter(torch.zeros(src.size(0)))

        def step(self, prev, state):
            return self.values.expand(prev.size(0), -1).clone(), Counter(state.steps + 1)

    class Counter:
        def __init__(self, steps):
            self.steps = steps

        def select(self, index):
            return Counter(self.steps[index])

    partial = Member(torch.tensor([0, 1, 2, 3, 5]), [-9.0, -9.0, -9.0, -1.0, -2.0])
    full = Member(None, [-9.0, -9.0, -9.0, -3.0, -5.0, -4.0, -6.0, -7.0])
    ensemble = Ensemble([partial, full])
    assert ensemble.output_ids() is None  # the union is every id
    state = ensemble.start(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2]))
    log_probs, state = ensemble.step(torch.tensor([2, 2]), state)
    inf = float("-inf")
    assert log_probs[0].tolist() == [-9.0, -9.0, -9.0, -2.0, inf, -3.0, inf, inf]
    assert isinstance(state, EnsembleState) and state.select(torch.tensor([1])).members[0].steps \
        .tolist() == [1.0]
    assert state.attention is None  # a member state without attention: the search goes without
    narrow = Ensemble([partial, partial])
    assert narrow.output_ids().tolist() == [0, 1, 2, 3, 5]


def test_checkpoints_with_different_tokenizers_are_refused(toy_run, tmp_path):
    payload = load_checkpoint(toy_run / "best.pt")
    chars = json.loads(payload["tokenizer"]["data"].decode())["chars"]
    other = json.dumps({"chars": chars[::-1]}).encode()
    save_checkpoint(tmp_path / "other.pt", {**payload, "tokenizer": {"kind": "char",
                                                                       "data": other}})
    result = runner.invoke(app, ["translate", str(toy_run / "best.pt"),
                                 str(tmp_path / "other.pt")], input="a b\n")
    assert_user_error(result, "other.pt", "different tokenizer")
    (tmp_path / "text.txt").write_text("a b\n")
    result = runner.invoke(app, ["evaluate", str(toy_run / "best.pt"), str(tmp_path / "other.pt"),
                                 "--source", str(tmp_path / "text.txt"),
                                 "--reference", str(tmp_path / "text.txt")])
    assert_user_error(result, "different tokenizer")


def test_cli_ensemble_translates_as_the_single_model(toy_run):
    sources = "".join(s + "\n" for s, _ in toy_valid(toy_run)[:10])
    one = runner.invoke(app, ["translate", str(toy_run / "best.pt")], input=sources)
    two = runner.invoke(app, ["translate", str(toy_run / "best.pt"), str(toy_run / "last.pt")],
                        input=sources)
    assert one.exit_code == two.exit_code == 0, two.output
    if torch.equal(*(load_checkpoint(toy_run / n)["model"]["src_embed.weight"]
                     for n in ("best.pt", "last.pt"))):
        assert one.stdout == two.stdout
    assert len(two.stdout.splitlines()) == 10


def test_sources_longer_than_the_training_limit_are_translated_whole(toy_run):
    loaded = load_model(toy_run / "best.pt")
    words = toy_valid(toy_run)[0][0].split()
    long_line = " ".join(words * (loaded.recipe.data.max_length // len(words) + 2))
    ids = loaded.tokenizer.encode(long_line)
    assert len(ids) > loaded.recipe.data.max_length
    assert encode_source(loaded.tokenizer, long_line) == ids + [EOS]
    config = loaded.recipe.decode
    whole = translate_lines(loaded, [long_line], config)
    assert hypotheses(whole) == hypotheses(translate_ids(loaded.model, [ids + [EOS]], config,
                                                         loaded.device))
    cut = translate_lines(loaded, ["x", long_line], replace(config, max_source_tokens=4))
    assert hypotheses(cut[1:]) == hypotheses(translate_ids(loaded.model, [ids[:4] + [EOS]],
                                                           config, loaded.device))


def test_a_cut_source_is_reported_with_its_line_number(toy_run):
    short, long = toy_valid(toy_run)[0][0], " ".join(["a"] * 12)  # 23 characters
    assert len(short) <= 12
    result = runner.invoke(app, ["translate", str(toy_run / "best.pt"), "--max-source-tokens",
                                 "12"], input=f"{short}\n{long}\n{short}\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: line 2:"), result.stderr
    assert "source of 23 tokens cut to 12" in warnings[0]
    whole = runner.invoke(app, ["translate", str(toy_run / "best.pt")], input=long + "\n")
    assert whole.exit_code == 0 and whole.stderr == "", whole.output


def test_read_batches_gives_what_has_arrived_and_numbers_bad_lines(tmp_path):
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"one\ntwo\nthr")
    with open(read_fd, "rb", buffering=0) as stream:
        batches = read_batches(stream, "<pipe>", max_lines=10, pause=0.05)
        assert next(batches) == ["one", "two"]  # a pause: what has arrived, without "thr"
        os.write(write_fd, b"ee\n" + b"x\n" * 25)
        os.close(write_fd)
        assert [len(b) for b in batches] == [10, 10, 6]  # busy input fills batches
    source = tmp_path / "bad.txt"
    source.write_bytes(b"fine\n" * 3 + b"\xff\n")
    with source.open("rb") as stream, pytest.raises(ValueError, match="bad.txt: line 4"):
        list(read_batches(stream, "bad.txt", max_lines=2))
    assert list(read_batches(io.BytesIO(b"a\nb\nc"), "mem", max_lines=2)) == [["a", "b"], ["c"]]


def _read_line(stream, timeout: float = 60.0) -> bytes:
    """One line from a pipe, or fail after ``timeout`` seconds instead of hanging."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no answer while the input stays open"
    return stream.readline()


def test_translate_answers_each_line_before_the_input_ends(toy_run):
    (first, first_ref), (second, second_ref) = toy_valid(toy_run)[:2]
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate",
                                str(toy_run / "best.pt")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write(first.encode() + b"\n")
        process.stdin.flush()
        assert _read_line(process.stdout).decode().rstrip("\n") == first_ref
        process.stdin.write(second.encode() + b"\n")
        process.stdin.flush()
        assert _read_line(process.stdout).decode().rstrip("\n") == second_ref
        process.stdin.close()
        assert process.stdout.read() == b""
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_generate_reads_prompts_line_by_line(lm_run):
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "generate",
                                str(lm_run / "best.pt"), "--input", "-", "--max-new-tokens", "5"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        for prompt in ("ROMEO:", "JULIET: O"):
            process.stdin.write(prompt.encode() + b"\n")
            process.stdin.flush()
            answer = json.loads(_read_line(process.stdout))
            assert answer["prompt"] == prompt and len(answer["samples"]) == 1
            assert answer["samples"][0].startswith(prompt)
            assert len(answer["samples"][0]) == len(prompt) + 5
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_ensemble_needs_a_shared_task(toy_run, lm_run):
    result = runner.invoke(app, ["translate", str(toy_run / "best.pt"), str(lm_run / "best.pt")],
                           input="a\n")
    assert_user_error(result, "lm")


@pytest.fixture
def toy_sources(toy_run) -> list[str]:
    return [s for s, _ in toy_valid(toy_run)]


def test_stream_keeps_one_line_per_input_in_order(toy_run, tmp_path: Path, toy_sources):
    lines = toy_sources[:25] + [""] + toy_sources[25:40]
    source = tmp_path / "src.txt"
    source.write_text("".join(line + "\n" for line in lines))
    result = runner.invoke(app, ["translate", str(toy_run / "best.pt"), "--input", str(source)])
    loaded = load_model(toy_run / "best.pt")
    expected = [h[0].tokens if h else [] for h in translate_lines(loaded, lines,
                                                                  loaded.recipe.decode)]
    assert result.stdout.splitlines() == [loaded.tokenizer.decode(t) for t in expected]
