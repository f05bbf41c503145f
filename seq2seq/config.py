"""The recipe: one tree of frozen dataclasses, loaded from TOML and overridable with ``--set``.

A recipe file has five sections (``[data]``, ``[tokenizer]``, ``[model]``, ``[train]``,
``[decode]``). Every key has a default here, so a recipe only states what differs. Unknown keys
and values of the wrong type raise :class:`ConfigError` naming the dotted key and the valid ones.
Standard library only: everything else imports this module, it imports nothing of ours.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus comes from and how it is filtered and batched."""

    task: str = "translation"  # "translation" | "lm"
    format: str = "lines"  # "lines" | "tsv" | "jsonl" | "hf" | "toy_reverse" | "text"
    root: str = "."  # relative paths below resolve against this directory
    source_lang: str = "de"
    target_lang: str = "en"
    train: str = "train.{lang}.gz"  # "{lang}" is replaced by source_lang / target_lang
    valid: str = "val.{lang}.gz"
    test: str = "test_2016_flickr.{lang}.gz"
    source_field: str = ""  # jsonl / hf field of the source text ("" = source_lang)
    target_field: str = ""  # jsonl / hf field of the target text ("" = target_lang)
    hf_dataset: str = ""  # Hugging Face dataset name, with format = "hf"
    hf_config: str = ""  # its configuration name, if it has several
    hf_train_split: str = "train"
    hf_valid_split: str = "validation"
    hf_test_split: str = "test"
    hf_translation_field: str = ""  # nested {lang: text} column (as in wmt16), "" = flat fields
    max_length: int = 100  # pairs with a side longer than this many tokens are dropped
    cache_dir: str = ""  # encoded corpora (memory-mapped by every rank); "" = RUN_DIR/corpus
    valid_max_lines: int = 0  # validate on the first N lines only (0 = all)
    text: str = ""  # character LM corpus; "" = Tiny Shakespeare shipped in the package
    valid_fraction: float = 0.1  # character LM: the last fraction of the text validates
    toy_vocab: int = 20  # toy reversal: number of distinct symbols
    toy_min_length: int = 3
    toy_max_length: int = 10
    toy_train_size: int = 2000
    toy_valid_size: int = 100


@dataclass(frozen=True)
class TokenizerConfig:
    """How text becomes ids; trained on the training data when a run starts."""

    kind: str = "sentencepiece"  # "sentencepiece" | "char"
    model_type: str = "unigram"  # sentencepiece: "unigram" | "bpe"
    vocab_size: int = 8000  # sentencepiece: pieces including the 4 special ids
    character_coverage: float = 1.0  # sentencepiece: fraction of characters covered
    max_sentences: int = 1_000_000  # sentencepiece: sentences sampled for training
    min_count: int = 1  # char: characters seen fewer times map to UNK
    # Subword regularisation (Kudo 2018): translation training pairs are re-segmented by sampling
    # at the start of every epoch; validation, test and inference keep the best segmentation.
    sampling_alpha: float = 0.0  # sentencepiece: 0 = off; unigram: smoothing, bpe: dropout rate
    sampling_nbest: int = -1  # sentencepiece unigram: sample among the n best (-1 = all)


@dataclass(frozen=True)
class ModelConfig:
    """The GNMT-style recurrent network (see DESIGN section 3)."""

    cell: str = "lstm"  # "lstm" | "gru"
    embed_dim: int = 256
    hidden_size: int = 512
    encoder_layers: int = 2  # the first is bidirectional
    decoder_layers: int = 2  # the first attends; layers >= 3 are residual
    dropout: float = 0.2
    tie_embeddings: bool = True  # share source, target and output embeddings
    output_projection: bool = True  # project [top; context] to embed_dim before the classifier
    bridge: bool = False  # decoder starts from a projection of the mean encoder output, not zeros
    target_vocabulary: bool = False  # classifier scores only pieces seen on the target side
    init_scale: float = 0.1  # uniform initialisation range


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and its budgets."""

    seed: int = 1
    max_steps: int = 0  # 0 = no step budget
    max_minutes: float = 0.0  # 0 = no time budget
    max_epochs: int = 0  # 0 = no epoch budget
    max_tokens: int = 4096  # token budget per batch (padding included)
    batch_size: int = 32  # character LM: parallel streams per batch
    bptt: int = 128  # character LM: characters per truncated-BPTT chunk
    accumulate: int = 1  # micro-batches per optimizer step
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "gnmt"  # "gnmt" | "inverse_sqrt" | "constant"
    warmup_steps: int = 200
    warmup_fraction: float = 0.0  # warm-up also ends at this fraction of the budget (0 = off)
    decay_start: float = 0.666  # gnmt: fraction of max_steps where halving starts
    decay_halvings: int = 4  # gnmt: number of halvings
    clip_norm: float = 5.0
    label_smoothing: float = 0.1
    weight_decay: float = 0.0
    log_every: int = 50  # steps per train event; it reports the token-weighted mean loss over them
    tensorboard: bool = False  # also write the events as TensorBoard scalars to RUN_DIR/tensorboard
    valid_every: int = 500
    valid_metric: str = "bleu"  # "bleu" | "loss"
    patience: int = 0  # stop after N validations without improvement (0 = never)
    keep_last: int = 2
    save_every: int = 0  # steps between extra step checkpoints, for averaging (0 = validations)
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16" (autocast on GPU only)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 0  # torch intra-op threads on CPU (0 = torch's default)
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings used by validation, translate and generate."""

    beam_size: int = 5
    length_penalty: float = 0.6  # GNMT alpha in ((5 + |Y|) / 6) ** alpha
    coverage_penalty: float = 0.0  # GNMT beta
    n_best: int = 1
    min_length: int = 0
    max_length_ratio: float = 1.5  # translation: max length = ceil(ratio * source) + offset
    max_length_offset: int = 10
    max_new_tokens: int = 500  # generation
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram: int = 0
    ban_unk: bool = False
    max_tokens_per_batch: int = 3000  # inference batch budget (source tokens)
    max_rows_per_batch: int = 480  # and this many decoding rows, sentences x beam (0 = no limit)
    workers: int = 0  # CPU: batches decoded side by side, one thread each (0 = auto, see inference)
    max_source_tokens: int = 0  # translation: cut longer sources, with a warning (0 = never)


@dataclass(frozen=True)
class Recipe:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Return ``value`` as ``kind`` or raise naming ``key``; ints are accepted as floats."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        where = f"{prefix}{unknown[0]}"
        valid = ", ".join(f"{prefix}{name}" for name in fields)
        raise ConfigError(f"unknown recipe key '{where}'; valid keys here: {valid}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{key}] table, got {value!r}")
            kwargs[name] = _build(kind, value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, kind)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    """Write ``value`` at dotted ``key`` in a nested dict (checked later by ``_build``)."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", ...]`` into a nested dict of strings."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        _set_dotted(tree, key.strip(), value.strip())
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Build a validated :class:`Recipe` from TOML-shaped data plus ``--set`` overrides."""
    recipe = _build(Recipe, _merge(values, parse_overrides(overrides or [])), "")
    validate(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file; errors name the file."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a valid TOML recipe ({error})") from None
    try:
        return recipe_from_dict(values, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


_CHOICES = {
    "data.task": ("translation", "lm"),
    "data.format": ("lines", "tsv", "jsonl", "hf", "toy_reverse", "text"),
    "tokenizer.kind": ("sentencepiece", "char"),
    "tokenizer.model_type": ("unigram", "bpe"),
    "model.cell": ("lstm", "gru"),
    "train.schedule": ("gnmt", "inverse_sqrt", "constant"),
    "train.optimizer": ("adam",),
    "train.valid_metric": ("bleu", "loss"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}


def validate(recipe: Recipe) -> None:
    """Check the values that types alone do not catch."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    model = recipe.model
    if model.hidden_size % 2:
        raise ConfigError("model.hidden_size must be even (the bidirectional layer splits it)")
    if min(model.encoder_layers, model.decoder_layers) < 1:
        raise ConfigError("model.encoder_layers and model.decoder_layers must be at least 1")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError("model.dropout must be in [0, 1)")
    if recipe.decode.beam_size < 1:
        raise ConfigError("decode.beam_size must be at least 1")
    if not 1 <= recipe.decode.n_best <= recipe.decode.beam_size:
        raise ConfigError("decode.n_best must be between 1 and decode.beam_size")
    if recipe.decode.max_rows_per_batch < 0:
        raise ConfigError("decode.max_rows_per_batch must be at least 0 (0 = no limit)")
    if recipe.decode.workers < 0:
        raise ConfigError("decode.workers must be at least 0 (0 = one per CPU thread)")
    if recipe.data.task == "lm" and recipe.data.format not in ("text", "hf"):
        raise ConfigError("data.format must be 'text' (or 'hf') when data.task = 'lm'")
    if model.target_vocabulary and recipe.data.task != "translation":
        raise ConfigError("model.target_vocabulary applies to data.task = 'translation' only "
                          "(a language model's input and output are one vocabulary)")
    _validate_sampling(recipe)


def _validate_sampling(recipe: Recipe) -> None:
    """Subword sampling needs a SentencePiece model and parallel training data."""
    tokenizer = recipe.tokenizer
    if not 0.0 <= tokenizer.sampling_alpha <= 1.0:
        raise ConfigError(f"tokenizer.sampling_alpha = {tokenizer.sampling_alpha} must be in "
                          "[0, 1] (0 = no subword sampling)")
    if tokenizer.sampling_nbest != -1 and tokenizer.sampling_nbest < 2:
        raise ConfigError(f"tokenizer.sampling_nbest = {tokenizer.sampling_nbest} must be -1 "
                          "(the whole lattice) or at least 2")
    if tokenizer.sampling_alpha > 0 and tokenizer.kind != "sentencepiece":
        raise ConfigError("tokenizer.sampling_alpha > 0 needs tokenizer.kind = 'sentencepiece' "
                          f"(it is {tokenizer.kind!r}); set tokenizer.sampling_alpha = 0")
    if tokenizer.sampling_alpha > 0 and recipe.model.target_vocabulary:
        raise ConfigError("tokenizer.sampling_alpha > 0 samples pieces outside the target "
                          "vocabulary that model.target_vocabulary = true keeps; turn one off")
    if tokenizer.sampling_alpha > 0 and recipe.data.task != "translation":
        raise ConfigError("tokenizer.sampling_alpha > 0 applies to data.task = 'translation' "
                          "only; set tokenizer.sampling_alpha = 0")


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain nested dicts (for checkpoints and ``recipe.toml``)."""
    return dataclasses.asdict(recipe)


def recipe_to_toml(recipe: Recipe) -> str:
    """Serialise the resolved recipe; ``load_recipe`` reads it back to an equal recipe."""
    import tomli_w

    return tomli_w.dumps(recipe_to_dict(recipe))


def resolve_path(root: str, path: str) -> Path:
    """A data path relative to ``data.root`` (absolute paths stay as they are)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(root).expanduser() / candidate

