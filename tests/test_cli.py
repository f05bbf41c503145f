"""The command line end to end: every command's help, a toy session, and every user error."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seq2seq.checkpoint import load_checkpoint
from seq2seq.cli import app
from seq2seq.data import read_parallel
from seq2seq.inference import load_model
from seq2seq.model import build_model

from .conftest import RECIPES, TOY_SETTINGS, toy_recipe

runner = CliRunner()
COMMANDS = ["train", "translate", "evaluate", "generate", "average-checkpoints", "plot",
            "tokenizer", "tokenizer train"]


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


def test_train_tokenizer_average_and_plot_commands(tmp_path, lm_text, lm_run):
    result = invoke("tokenizer", "train", RECIPES / "tinyshakespeare_char.toml", "--out",
                    tmp_path / "tok", "--set", f"data.text={lm_text}")
    assert result.exit_code == 0, result.output
    assert "entries" in result.stdout and (tmp_path / "tok" / "tokenizer.char").exists()
    average = tmp_path / "avg.pt"
    result = invoke("average-checkpoints", lm_run / "best.pt", lm_run / "last.pt",
                    "--output", average)
    assert result.exit_code == 0, result.output
    assert load_model(average).recipe.data.task == "lm"
    result = invoke("plot", lm_run, "--output", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


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
