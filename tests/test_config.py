"""Recipes: loading, overrides with type coercion, and errors that name the key."""

import copy
from pathlib import Path

import pytest

from seq2seq.config import (
    ConfigError,
    load_recipe,
    recipe_from_dict,
    recipe_to_toml,
    resolve_path,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips_through_toml(path, tmp_path):
    recipe = load_recipe(path)
    saved = tmp_path / "recipe.toml"
    saved.write_text(recipe_to_toml(recipe))
    assert load_recipe(saved) == recipe


@pytest.mark.parametrize("root", ["a\nb", 'quote " and \\ back', "tab\tand \u00e9\u00df \U0001F600",
                                  "[section]\nkey = 1"])
def test_any_string_value_round_trips_through_toml(root, tmp_path):
    recipe = load_recipe(RECIPES[0], [f"data.root={root}"])
    assert recipe.data.root == root
    saved = tmp_path / "recipe.toml"
    saved.write_text(recipe_to_toml(recipe), encoding="utf-8")
    assert load_recipe(saved) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_key_is_commented(path):
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"{path.name}:{number} has no comment: {line}"


def test_overrides_coerce_types():
    recipe = recipe_from_dict({}, ["train.lr=0.5", "model.hidden_size=64", "data.root=/x",
                                   "model.tie_embeddings=false", "train.max_minutes=2"])
    assert recipe.train.lr == 0.5
    assert recipe.model.hidden_size == 64
    assert recipe.model.tie_embeddings is False
    assert recipe.data.root == "/x"
    assert recipe.train.max_minutes == 2.0


def test_override_beats_file_value(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nlr = 0.1\nseed = 3\n")
    recipe = load_recipe(path, ["train.lr=0.2"])
    assert (recipe.train.lr, recipe.train.seed) == (0.2, 3)


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message and "train.learning_rate" in message and "train.lr" in message


def test_unknown_override_and_section():
    with pytest.raises(ConfigError, match="model.hiden_size"):
        recipe_from_dict({}, ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="unknown recipe key 'modle'"):
        recipe_from_dict({"modle": {}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        recipe_from_dict({}, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="model.dropout: expected float"):
        recipe_from_dict({"model": {"dropout": "high"}})
    with pytest.raises(ConfigError, match="train: expected a"):
        recipe_from_dict({"train": 3})


def test_invalid_choice_and_malformed_override():
    with pytest.raises(ConfigError, match="model.cell"):
        recipe_from_dict({}, ["model.cell=rnn"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        recipe_from_dict({}, ["train.lr"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "none.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="broken.toml: not a valid TOML"):
        load_recipe(broken)


def test_overrides_leave_the_values_they_start_from_untouched_and_paths_resolve():
    """A recipe file read once can take different --set overrides: nothing leaks between them."""
    values = {"train": {"lr": 0.1}, "model": {"hidden_size": 64}}
    snapshot = copy.deepcopy(values)
    changed = recipe_from_dict(values, ["train.lr=0.5", "model.cell=gru", "decode.beam_size=2"])
    assert values == snapshot
    plain = recipe_from_dict(values)
    assert (changed.train.lr, changed.model.cell, changed.decode.beam_size) == (0.5, "gru", 2)
    assert (plain.train.lr, plain.model.cell, plain.decode.beam_size) == (0.1, "lstm", 5)
    assert plain.model.hidden_size == changed.model.hidden_size == 64
    assert plain == recipe_from_dict(snapshot) != changed
    assert resolve_path("/data", "a.txt") == Path("/data/a.txt")
    assert resolve_path("/data", "/abs/a.txt") == Path("/abs/a.txt")


def test_subword_sampling_keys_are_checked():
    recipe = recipe_from_dict({}, ["tokenizer.sampling_alpha=0.2", "tokenizer.sampling_nbest=64"])
    assert (recipe.tokenizer.sampling_alpha, recipe.tokenizer.sampling_nbest) == (0.2, 64)
    assert recipe_from_dict({}).tokenizer.sampling_alpha == 0.0
    with pytest.raises(ConfigError, match=r"tokenizer.sampling_alpha = 1.5 must be in \[0, 1\]"):
        recipe_from_dict({}, ["tokenizer.sampling_alpha=1.5"])
    with pytest.raises(ConfigError, match="tokenizer.sampling_nbest = 1 must be -1"):
        recipe_from_dict({}, ["tokenizer.sampling_nbest=1"])
    with pytest.raises(ConfigError, match="needs tokenizer.kind = 'sentencepiece' \\(it is 'char'"):
        recipe_from_dict({}, ["tokenizer.kind=char", "tokenizer.sampling_alpha=0.1"])
    with pytest.raises(ConfigError, match="data.task = 'translation' only"):
        recipe_from_dict({}, ["data.task=lm", "data.format=text", "tokenizer.sampling_alpha=0.1"])
