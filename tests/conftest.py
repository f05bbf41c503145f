"""Shared fixtures: tiny recipes and one trained toy model reused by the slower tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seq2seq.config import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# The toy reversal recipe shrunk for tests (as --set overrides, so subprocesses can use them).
TOY_SETTINGS = ("data.toy_train_size=600", "data.toy_valid_size=40", "data.toy_vocab=8",
                "data.toy_max_length=6", "train.log_every=10", "train.valid_every=1000",
                "train.keep_last=1")


def toy_recipe(*overrides: str) -> Recipe:
    """The test-sized toy reversal recipe with extra ``--set`` style overrides."""
    return load_recipe(RECIPES / "toy_reverse.toml", [*TOY_SETTINGS, *overrides])


def lm_recipe(text_file: Path, *overrides: str) -> Recipe:
    """A tiny character LM on ``text_file``."""
    base = [f"data.text={text_file}", "model.embed_dim=16", "model.hidden_size=32",
            "model.decoder_layers=2", "model.dropout=0.1", "train.batch_size=4", "train.bptt=16",
            "train.max_minutes=0", "train.log_every=5", "train.valid_every=1000",
            "train.keep_last=1", "decode.max_new_tokens=20"]
    return load_recipe(RECIPES / "tinyshakespeare_char.toml", base + list(overrides))


@pytest.fixture(scope="session")
def lm_text(tmp_path_factory) -> Path:
    """A few kilobytes of Shakespeare-like text."""
    path = tmp_path_factory.mktemp("lm") / "text.txt"
    verse = ("ROMEO:\nBut soft, what light through yonder window breaks?\n"
             "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n")
    path.write_text(verse * 30, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A toy reversal model trained once for the session (about 15 s on 2 cores)."""
    from seq2seq.train import train

    out = tmp_path_factory.mktemp("toy_run")
    train(toy_recipe("train.max_steps=450", "data.toy_train_size=2000"), out)
    return out


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, lm_text) -> Path:
    """A tiny character LM trained for a few steps."""
    from seq2seq.train import train

    out = tmp_path_factory.mktemp("lm_run")
    train(lm_recipe(lm_text, "train.max_steps=20"), out)
    return out


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """Offline Hugging Face with a private cache, even if datasets was imported earlier."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
