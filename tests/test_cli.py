"""The command line end to end: every command's help, a toy session, and every user error."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from seq2seq.cli import app
from seq2seq.data import read_parallel
from seq2seq.inference import load_model
from seq2seq.model import build_model

from .conftest import RECIPES, TOY_SETTINGS, toy_recipe

runner = CliRunner()
COMMANDS = ["train", "translate", "evaluate", "generate", "average-checkpoints", "plot",
            "tokenizer", "tokenizer train", "serve"]


def invoke(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one error line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = invoke(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_python_dash_m_lists_the_commands():
    output = subprocess.run([sys.executable, "-m", "seq2seq", "--help"], capture_output=True,
                            text=True, check=True).stdout
    for command in ("train", "translate", "evaluate", "generate", "average-checkpoints", "plot"):
        assert command in output


def toy_valid(toy_run: Path) -> list[tuple[str, str]]:
    recipe = load_model(toy_run / "last.pt").recipe
    return read_parallel(recipe.data, "valid", seed=recipe.train.seed)


def test_translate_streams_lines_in_order_with_empty_lines(toy_run):
    pairs = toy_valid(toy_run)[:6]
    lines = [pairs[0][0], "", pairs[1][0], pairs[2][0], "", pairs[3][0]]
    result = invoke("translate", toy_run / "best.pt", "--beam-size", "3",
                    input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    outputs = result.stdout.split("\n")[:-1]
    assert len(outputs) == len(lines)
    assert outputs[1] == outputs[4] == ""
    assert [outputs[i] for i in (0, 2, 3, 5)] == [pairs[i][1] for i in range(4)]


def test_translate_n_best_tsv_and_files(toy_run, tmp_path):
    pairs = toy_valid(toy_run)[:3]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(s for s, _ in pairs) + "\n\n")  # the last input is empty
    out = tmp_path / "out.tsv"
    result = invoke("translate", toy_run / "best.pt", "--input", source, "--output", out,
                    "--beam-size", "4", "--n-best", "2")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[-1] == ["3", "1", "0.0000", ""]
    rows = rows[:-1]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(i, k) for i in range(3) for k in (1, 2)]
    assert all(float(rows[2 * i][2]) >= float(rows[2 * i + 1][2]) for i in range(3))
    assert [rows[2 * i][3] for i in range(3)] == [t for _, t in pairs]


def test_evaluate_translates_and_scores_and_references_score_100(toy_run, tmp_path):
    pairs = toy_valid(toy_run)
    source, reference = tmp_path / "src.txt", tmp_path / "ref.txt.gz"
    source.write_text("\n".join(s for s, _ in pairs) + "\n")
    reference.write_bytes(gzip.compress(("\n".join(t for _, t in pairs) + "\n").encode()))
    result = invoke("evaluate", toy_run / "best.pt", "--source", source, "--reference", reference,
                    "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["bleu"] > 80 and "nrefs:1" in scores["signatures"]["bleu"]
    same = invoke("evaluate", "--hypotheses", reference, "--reference", reference)
    assert same.exit_code == 0, same.output
    assert same.stdout.startswith("BLEU  100.00")


def test_batch_budget_changes_batches_not_translations(toy_run, tmp_path):
    pairs = toy_valid(toy_run)
    source, reference = tmp_path / "src.txt", tmp_path / "ref.txt"
    source.write_text("\n".join(s for s, _ in pairs) + "\n")
    reference.write_text("\n".join(t for _, t in pairs) + "\n")
    outputs = []
    for budget in ("3000", "9"):  # one batch; a sentence or two per batch
        result = invoke("translate", toy_run / "best.pt", "--input", source,
                        "--max-tokens-per-batch", budget)
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
        scored = invoke("evaluate", toy_run / "best.pt", "--source", source, "--reference",
                        reference, "--max-tokens-per-batch", budget, "--json")
        assert scored.exit_code == 0, scored.output
        outputs.append(json.loads(scored.stdout)["bleu"])
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]


def test_int8_agrees_with_fp32_on_most_sentences(toy_run, tmp_path):
    source = tmp_path / "src.txt"
    source.write_text("\n".join(s for s, _ in toy_valid(toy_run)) + "\n")
    fp32 = invoke("translate", toy_run / "best.pt", "--input", source)
    int8 = invoke("translate", toy_run / "best.pt", "--input", source, "--quantize", "int8")
    assert fp32.exit_code == int8.exit_code == 0, int8.output
    pairs = list(zip(fp32.stdout.splitlines(), int8.stdout.splitlines(), strict=True))
    assert sum(a == b for a, b in pairs) / len(pairs) >= 0.8


def test_generate_streams_a_sample_and_seeds_reproduce(lm_run):
    first = invoke("generate", lm_run / "best.pt", "--prompt", "ROMEO:", "--max-new-tokens", "15",
                   "--seed", "3")
    again = invoke("generate", lm_run / "best.pt", "--prompt", "ROMEO:", "--max-new-tokens", "15",
                   "--seed", "3")
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    assert first.stdout.startswith("ROMEO:") and len(first.stdout) == len("ROMEO:") + 15 + 1
    several = invoke("generate", lm_run / "best.pt", "--num-samples", "2", "--max-new-tokens", "5",
                     "--beam-size", "2")
    assert several.exit_code == 0, several.output
    assert several.stdout.count("--- sample") == 2


def test_train_tokenizer_and_plot_commands(tmp_path, lm_text, lm_run):
    result = invoke("tokenizer", "train", RECIPES / "tinyshakespeare_char.toml", "--out",
                    tmp_path / "tok", "--set", f"data.text={lm_text}")
    assert result.exit_code == 0, result.output
    assert "entries" in result.stdout and (tmp_path / "tok" / "tokenizer.char").exists()
    result = invoke("plot", lm_run, "--output", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_average_checkpoints_writes_the_exact_mean_of_different_weights(lm_run, tmp_path):
    first = load_checkpoint(lm_run / "last.pt")
    # x and 4x: the mean 2.5x is exact in float32 (one rounding either way)
    second = {**first, "step": first["step"] + 1,
              "model": {name: tensor * 4 for name, tensor in first["model"].items()}}
    save_checkpoint(tmp_path / "a.pt", first)
    save_checkpoint(tmp_path / "b.pt", second)
    result = invoke("average-checkpoints", tmp_path / "a.pt", tmp_path / "b.pt",
                    "--output", tmp_path / "avg.pt")
    assert result.exit_code == 0, result.output
    averaged = load_checkpoint(tmp_path / "avg.pt")
    assert all(t.is_floating_point() for t in first["model"].values())
    assert averaged["model"].keys() == first["model"].keys()
    for name, tensor in first["model"].items():
        assert torch.equal(averaged["model"][name], tensor * 2.5), name
    assert averaged["step"] == first["step"] + 1  # all but the weights: the last checkpoint's
    assert load_model(tmp_path / "avg.pt").recipe.data.task == "lm"


def test_translate_into_a_closed_pipe_exits_quietly(toy_run, tmp_path):
    """``seq2seq translate CKPT < many lines | head -1``: the reader leaves after one line,
    long before the last of 8 chunks of 1,000 lines is written."""
    source = tmp_path / "many.txt"
    source.write_text("".join(s + "\n" for s, _ in toy_valid(toy_run)) * 200)  # 8,000 lines
    with source.open("rb") as stdin:
        process = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate",
                                    str(toy_run / "best.pt"), "--beam-size", "1"],
                                   stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().strip()  # the first translation
    process.stdout.close()  # the pipe breaks: the writes to come fail
    errors = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, errors
    assert "Traceback" not in errors and "Error" not in errors, errors


def test_int8_stays_within_one_bleu_of_fp32(toy_run, tmp_path):
    """On 400 unseen toy sentences (the session's toy model: about 15 s of training)."""
    recipe = load_model(toy_run / "last.pt").recipe
    data = dataclasses.replace(recipe.data, toy_valid_size=400)
    pairs = read_parallel(data, "valid", seed=recipe.train.seed + 1)
    source, reference = tmp_path / "src.txt", tmp_path / "ref.txt"
    source.write_text("".join(s + "\n" for s, _ in pairs))
    reference.write_text("".join(t + "\n" for _, t in pairs))
    bleu = {}
    for quantize in ("none", "int8"):
        result = invoke("evaluate", toy_run / "best.pt", "--source", source, "--reference",
                        reference, "--quantize", quantize, "--json")
        assert result.exit_code == 0, result.output
        bleu[quantize] = json.loads(result.stdout)["bleu"]
    assert bleu["none"] > 50  # a model that has learned something to lose
    assert abs(bleu["int8"] - bleu["none"]) <= 1.0, bleu


def test_attention_plot_writes_one_png_per_sentence(toy_run, tmp_path):
    pairs = toy_valid(toy_run)[:2]
    result = invoke("translate", toy_run / "best.pt", "--attention-plot", tmp_path / "att",
                    input="\n".join(s for s, _ in pairs) + "\n")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == ["000000.png", "000001.png"]


# --- user errors: one line, exit code 2 -------------------------------------------------------


def test_misspelt_recipe_key(tmp_path):
    result = invoke("train", RECIPES / "toy_reverse.toml", "--out", tmp_path / "r",
                    "--set", "train.learning_rate=1")
    assert_user_error(result, "train.learning_rate", "train.lr")


def test_mismatched_parallel_files(tmp_path):
    (tmp_path / "train.de").write_text("a\nb\nc\n")
    (tmp_path / "train.en").write_text("a\nb\n")
    result = invoke("tokenizer", "train", RECIPES / "multi30k_de_en.toml", "--out", tmp_path / "r",
                    "--set", f"data.root={tmp_path}", "--set", "data.train=train.{lang}")
    assert_user_error(result, "train.de", "train.en", "3", "2")


def test_bad_utf8_in_training_data(tmp_path):
    (tmp_path / "train.de").write_bytes(b"gut\nschl\xffcht\n")
    (tmp_path / "train.en").write_text("good\nbad\n")
    result = invoke("tokenizer", "train", RECIPES / "multi30k_de_en.toml", "--out", tmp_path / "r",
                    "--set", f"data.root={tmp_path}", "--set", "data.train=train.{lang}")
    assert_user_error(result, "train.de", "line 2")


def test_missing_truncated_and_wrong_kind_checkpoints(tmp_path, toy_run, lm_run):
    assert_user_error(invoke("translate", tmp_path / "none.pt", input="a\n"), "none.pt")
    truncated = tmp_path / "cut.pt"
    data = (toy_run / "last.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert_user_error(invoke("translate", truncated, input="a\n"), "cut.pt", "truncated")
    assert_user_error(invoke("translate", lm_run / "best.pt", input="a\n"), "seq2seq generate")
    assert_user_error(invoke("generate", toy_run / "best.pt"), "seq2seq translate")


def test_bad_translate_options_and_input(toy_run):
    best = toy_run / "best.pt"
    assert_user_error(invoke("translate", best, "--beam-size", "0", input="a\n"), "beam size")
    assert_user_error(invoke("translate", best, "--beam-size", "2", "--n-best", "3", input="a\n"),
                      "n-best")
    assert_user_error(invoke("translate", best, "--device", "tpu", input="a\n"), "tpu")
    assert_user_error(invoke("translate", best, "--quantize", "int4", input="a\n"), "int4")
    assert_user_error(invoke("translate", best, input=b"a b\n\xff\xfe\n"), "line 2", "UTF-8")


def test_int8_without_torch_ao_is_a_clear_error(toy_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # import raises ImportError
    assert_user_error(invoke("translate", toy_run / "best.pt", "--quantize", "int8",
                             input="a\n"), "torch.ao.quantization", "fp32")


def test_translate_output_file_is_replaced_only_on_success(toy_run, tmp_path):
    """A bad input line leaves an existing --output file exactly as it was, and no stray files."""
    out = tmp_path / "out.txt"
    out.write_text("earlier results\n")
    source = tmp_path / "in.txt"
    source.write_bytes(b"a b c\n\xff\xfe\n")
    failed = invoke("translate", toy_run / "best.pt", "--input", source, "--output", out)
    assert_user_error(failed, "line 2")
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]
    source.write_bytes(b"a b c\n")
    succeeded = invoke("translate", toy_run / "best.pt", "--input", source, "--output", out)
    assert succeeded.exit_code == 0, succeeded.output
    assert out.read_text().count("\n") == 1 and out.read_text() != "earlier results\n"
    missing = invoke("translate", toy_run / "best.pt", "--input", source, "--output",
                     tmp_path / "no" / "such" / "dir.txt")
    assert_user_error(missing, "cannot write")


def train_toy(out: Path, *options: str):
    sets = [arg for setting in TOY_SETTINGS for arg in ("--set", setting)]
    return invoke("train", RECIPES / "toy_reverse.toml", "--out", out, *sets, *options)


def test_init_from_refuses_a_model_of_another_size_naming_the_parameter(toy_run, tmp_path):
    checkpoint = toy_run / "last.pt"
    result = train_toy(tmp_path / "r", "--set", "model.hidden_size=32", "--init-from", checkpoint)
    assert_user_error(result, str(checkpoint), "model.* keys")
    name = re.search(r"parameter (\S+) has shape", result.stderr).group(1)
    source = load_checkpoint(checkpoint)
    wanted = build_model(toy_recipe("model.hidden_size=32").model, source["vocab_size"],
                         "translation").state_dict()
    differs = [n for n, t in wanted.items() if source["model"][n].shape != t.shape]
    assert differs[0] == name  # the first parameter that does not fit
    both = train_toy(tmp_path / "s", "--init-from", checkpoint, "--resume")
    assert_user_error(both, "--init-from", "--resume")


def test_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    result = train_toy(tmp_path / "r", "--set", "train.tensorboard=true")
    assert_user_error(result, "train.tensorboard", "pip install 'seq2seq[tensorboard]'")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_evaluate_user_errors(toy_run, tmp_path):
    pairs = toy_valid(toy_run)[:3]
    source, reference = tmp_path / "src.txt", tmp_path / "ref.txt"
    source.write_text("".join(s + "\n" for s, _ in pairs))
    reference.write_text("".join(t + "\n" for _, t in pairs))
    best = toy_run / "best.pt"
    assert_user_error(invoke("evaluate", best, "--source", source, "--reference",
                             tmp_path / "none.txt"), "none.txt")
    for args in ((best, "--source", source, "--hypotheses", reference),  # both
                 (), (best,)):  # neither; a checkpoint without --source
        assert_user_error(invoke("evaluate", *args, "--reference", reference),
                          "either CHECKPOINT with --source, or --hypotheses")
    short = tmp_path / "short.txt"
    short.write_text(pairs[0][1] + "\n")
    assert_user_error(invoke("evaluate", best, "--source", source, "--reference", short),
                      "src.txt has 3 lines", "short.txt has 1", "line-aligned")
    assert_user_error(invoke("evaluate", "--hypotheses", short, "--reference", reference),
                      "1 hypotheses but 3 references")


def test_average_checkpoints_user_errors(toy_run, lm_run, tmp_path):
    out = tmp_path / "avg.pt"
    assert_user_error(invoke("average-checkpoints", toy_run / "last.pt", lm_run / "last.pt",
                             "--output", out), str(toy_run / "last.pt"), "parameter names differ")
    assert_user_error(invoke("average-checkpoints", toy_run / "last.pt", tmp_path / "none.pt",
                             "--output", out), "none.pt", "no such checkpoint")
    assert not out.exists()


def test_plot_without_metrics_is_a_user_error(tmp_path):
    pytest.importorskip("matplotlib")
    assert_user_error(invoke("plot", tmp_path), "metrics.jsonl", "run directory")


@pytest.mark.parametrize("option,value,message", [
    ("--num-samples", "0", "--num-samples must be at least 1, got 0"),
    ("--temperature", "-1", "temperature must be at least 0"),
    ("--top-p", "1.5", "top-p must be in (0, 1]"),
    ("--top-p", "0", "top-p must be in (0, 1]"),
    ("--top-k", "-1", "top-k must be at least 0"),
    ("--max-new-tokens", "0", "max-new-tokens must be at least 1"),
])
def test_bad_generate_options(lm_run, option, value, message):
    assert_user_error(invoke("generate", lm_run / "best.pt", option, value), message)
