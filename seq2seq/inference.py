"""Using a trained model: checkpoint -> tokenizer + model -> search -> text, for both tasks.

Translation batches inputs by length under a token budget and restores the input order.
Streaming translates, in one batch, the lines that have arrived when the input pauses (at most a
bounded chunk of them), so a person at a terminal gets each answer at once while a file or a fast
pipe still fills big batches, and memory stays flat on endless input. Several checkpoints that
share a tokenizer load as one :class:`~seq2seq.ensemble.Ensemble`. Generation primes the
character LM with a prompt and samples (or beam-searches) a continuation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, TextIO

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from seq2seq.checkpoint import CheckpointError, load_checkpoint
from seq2seq.config import DecodeConfig, Recipe, recipe_from_dict
from seq2seq.data import chunked, decode_utf8, inference_batches
from seq2seq.distributed import DistributedError, resolve_device
from seq2seq.ensemble import Ensemble
from seq2seq.files import atomic_write
from seq2seq.heap import release_free_memory
from seq2seq.model import QuantizationUnavailable, build_model, quantize_int8
from seq2seq.model.recurrent import DECODING_PRIMITIVE_CACHE, bound_primitive_cache
from seq2seq.search import Hypothesis, decode
from seq2seq.tokenizer import BOS, EOS, PAD, Tokenizer, tokenizer_from_bytes

log = logging.getLogger(__name__)

STREAM_CHUNK_LINES = 1000  # the most lines one streaming batch takes
STREAM_PAUSE_S = 0.01  # input quiet this long: translate what has arrived


class InferenceError(ValueError):
    """A user mistake at inference time (wrong checkpoint kind, bad input, bad option)."""


@dataclass
class LoadedModel:
    """Everything a checkpoint holds that decoding needs."""

    recipe: Recipe
    model: nn.Module
    tokenizer: Tokenizer
    device: torch.device
    step: int


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[TextIO]:
    """A UTF-8 text file that appears at ``path`` only when the block completes
    (:func:`~seq2seq.files.atomic_write`): a bad input line 5,000 or Ctrl-C leaves whatever
    ``path`` held before untouched. An unwritable place is an :class:`InferenceError`."""
    stack = contextlib.ExitStack()
    try:
        sink = stack.enter_context(atomic_write(path, "w", encoding="utf-8"))
    except OSError as error:
        raise InferenceError(f"{path}: cannot write there ({error.strerror})") from None
    with stack:
        yield sink


def load_model(path: str | Path, device: str = "cpu", quantize: str | None = None) -> LoadedModel:
    """Rebuild the model and tokenizer from a checkpoint alone. The options are checked first,
    before the checkpoint is read."""
    try:
        target = resolve_device(device)
    except DistributedError as error:
        raise InferenceError(str(error)) from None
    if quantize not in (None, "", "none", "int8"):
        raise InferenceError(f"unknown quantisation {quantize!r}; use int8")
    if quantize == "int8" and target.type != "cpu":
        raise InferenceError("--quantize int8 runs on the CPU only; use --device cpu")
    bound_primitive_cache(DECODING_PRIMITIVE_CACHE)
    payload = load_checkpoint(path, mmap=True)
    try:
        recipe = recipe_from_dict(payload["recipe"])
        tokenizer = tokenizer_from_bytes(payload["tokenizer"]["kind"], payload["tokenizer"]["data"])
        model = build_model(recipe.model, payload["vocab_size"], recipe.data.task)
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: checkpoint does not match this version ({error})") from None
    model.eval()
    if quantize == "int8":
        try:
            model = quantize_int8(model, inplace=True)
        except QuantizationUnavailable as error:
            raise InferenceError(str(error)) from None
    loaded = LoadedModel(recipe, model.to(target), tokenizer, target, int(payload.get("step", 0)))
    if target.type == "cpu":  # the copies made while loading and quantising leave holes
        release_free_memory()
    return loaded


def load_models(paths: list[str | Path], device: str = "cpu",
                quantize: str | None = None) -> LoadedModel:
    """One checkpoint as :func:`load_model`; several as one :class:`Ensemble` that decodes with
    the first one's recipe. The checkpoints must hold translation models and one tokenizer."""
    if not paths:
        raise InferenceError("no checkpoint given")
    loaded = [load_model(path, device, quantize) for path in paths]
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0]
    for path, other in zip(paths, loaded, strict=True):
        require_task(other, "translation", path)
        same = (other.tokenizer.kind == first.tokenizer.kind
                and other.tokenizer.to_bytes() == first.tokenizer.to_bytes())
        if not same:
            raise InferenceError(f"{path} has a different tokenizer from {paths[0]}; an "
                                 "ensemble needs checkpoints that share one tokenizer")
    ensemble = Ensemble([item.model for item in loaded]).to(first.device).eval()
    return replace(first, model=ensemble)


def require_task(loaded: LoadedModel, task: str, path: str | Path) -> None:
    """A translation command given an LM checkpoint (or the reverse) is a user error."""
    actual = loaded.recipe.data.task
    if actual != task:
        fix = "seq2seq generate" if actual == "lm" else "seq2seq translate"
        raise InferenceError(f"{path} holds a {actual!r} model, not {task!r}; use {fix}")


def check_decode_options(config: DecodeConfig) -> None:
    """Options that the recipe validator cannot see because they come from the command line."""
    if config.beam_size < 1:
        raise InferenceError(f"beam size must be at least 1, got {config.beam_size}")
    if not 1 <= config.n_best <= config.beam_size:
        raise InferenceError(f"n-best ({config.n_best}) must be between 1 and the beam size "
                             f"({config.beam_size})")
    if config.temperature < 0:
        raise InferenceError(f"temperature must be at least 0 (0 = greedy), got "
                             f"{config.temperature}")
    if config.top_k < 0:
        raise InferenceError(f"top-k must be at least 0 (0 = off), got {config.top_k}")
    if not 0 < config.top_p <= 1:
        raise InferenceError(f"top-p must be in (0, 1] (1 = off), got {config.top_p}")
    if config.max_new_tokens < 1:
        raise InferenceError(f"max-new-tokens must be at least 1, got {config.max_new_tokens}")
    if config.max_source_tokens < 0:
        raise InferenceError(f"max-source-tokens must be at least 0 (0 = no limit), got "
                             f"{config.max_source_tokens}")
    if config.max_rows_per_batch < 0:
        raise InferenceError(f"max-rows-per-batch must be at least 0 (0 = no limit), got "
                             f"{config.max_rows_per_batch}")
    if config.workers < 0:
        raise InferenceError(f"workers must be at least 0 (0 = one per CPU thread), got "
                             f"{config.workers}")


def translation_max_lengths(src_lengths: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """ceil(ratio * source tokens) + offset per input; src_lengths count the EOS."""
    tokens = (src_lengths - 1).double()
    return (torch.ceil(config.max_length_ratio * tokens) + config.max_length_offset).long()


MAX_AUTO_WORKERS = 4  # auto workers stop here: each holds a batch, and all share one GIL


def decoding_workers(config: DecodeConfig, device: torch.device) -> tuple[int, int]:
    """How many batches decode at once on ``device``, and the intra-op threads of each.

    One beam-search step is a few matmuls and many small ops on (rows x beams) tensors that torch
    runs on one thread whatever its thread count, with Python in between; a second thread mostly
    waits. Two batches side by side, one thread each, keep both cores busy (README, "Decoding
    test_2016_flickr side by side"). On the CPU ``config.workers`` (0 = one per torch thread,
    at most ``MAX_AUTO_WORKERS``) share torch's threads; each worker holds its own batch, so peak
    memory grows with them. CUDA decodes one batch at a time.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return 1, threads
    workers = config.workers or min(threads, MAX_AUTO_WORKERS)
    return workers, max(1, threads // workers)


def _side_by_side(run: Callable[[list[int]], list[list[Hypothesis]]],
                  batches: list[list[int]], workers: int,
                  threads: int) -> list[list[list[Hypothesis]]]:
    """``run`` over ``batches`` on ``workers`` threads with ``threads`` intra-op threads each;
    the results in batch order.

    The threads end with the call. Idle threads that have run OpenMP work make the calling
    thread's own parallel regions slower (by about a third in training, measured: OpenMP then
    counts more threads than cores and stops spinning between regions), so they are not kept.
    torch takes the thread count a thread last set as the default of threads started later, so
    the caller's count is set again at the end."""
    own = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, "seq2seq-decode", initializer=torch.set_num_threads,
                              initargs=(threads,))
    try:
        return list(pool.map(run, batches))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: only the running batches finish
        torch.set_num_threads(own)


@torch.inference_mode()
def _translate_batch(model: nn.Module, src_ids: list[list[int]], indices: list[int],
                     config: DecodeConfig, device: torch.device, strategy: str,
                     keep_attention: bool, max_lengths: torch.Tensor | None
                     ) -> list[list[Hypothesis]]:
    """One batch of :func:`translate_ids`: the hypotheses of ``src_ids[i]`` for i in
    ``indices``, in that order. Inference mode is per thread, so a worker enters it here."""
    src = pad_sequence([torch.tensor(src_ids[i]) for i in indices], batch_first=True,
                       padding_value=PAD).to(device)
    src_lengths = torch.tensor([len(src_ids[i]) for i in indices], device=device)
    caps = (translation_max_lengths(src_lengths, config) if max_lengths is None
            else max_lengths[indices].to(device))
    state = model.start(src, src_lengths)
    first = torch.full((len(indices),), BOS, dtype=torch.long, device=device)
    return decode(model.step, state, first, caps, config, strategy,
                  keep_attention=keep_attention, token_ids=model.output_ids())


def translate_ids(model: nn.Module, src_ids: list[list[int]], config: DecodeConfig,
                  device: torch.device, strategy: str = "beam", keep_attention: bool = False,
                  max_lengths: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Decode source id lists (each ending in EOS); results come back in input order.
    ``keep_attention`` fills ``Hypothesis.attention`` (for plots; it costs time and memory).
    ``max_lengths`` (len(src_ids),) long caps each output instead of
    :func:`translation_max_lengths` (benchmarks decode random weights to a fixed length).

    Batches run side by side on :func:`decoding_workers` threads when there are several. The
    batches are the same whatever the workers, and each is searched as it would be alone, so the
    output does not depend on them (an int8 model's does depend on the batches, through its
    per-batch activation scales)."""
    rows_per_sentence = config.beam_size if strategy == "beam" else 1
    max_sentences = (max(1, config.max_rows_per_batch // rows_per_sentence)
                     if config.max_rows_per_batch else 0)  # 0: no limit
    batches = list(inference_batches(src_ids, config.max_tokens_per_batch, max_sentences))
    run = functools.partial(_translate_batch, model, src_ids, config=config, device=device,
                            strategy=strategy, keep_attention=keep_attention,
                            max_lengths=max_lengths)
    workers, threads = decoding_workers(config, device)
    if workers > 1 and len(batches) > 1:
        decoded: Iterable[list[list[Hypothesis]]] = _side_by_side(run, batches, workers, threads)
    else:
        decoded = map(run, batches)
    results: list[list[Hypothesis]] = [[] for _ in src_ids]
    for indices, hyps in zip(batches, decoded, strict=True):
        for i, hyp in zip(indices, hyps, strict=True):
            results[i] = hyp
    return results


def encode_source(tokenizer: Tokenizer, line: str, max_length: int = 0) -> list[int]:
    """Source ids x + [EOS]; x cut to ``max_length`` tokens when it is above 0 (validation cuts
    as training did; translation keeps the whole sentence, the model has no positional limit)."""
    ids = tokenizer.encode(line)
    return (ids[:max_length] if max_length > 0 else ids) + [EOS]


def _source_ids(tokenizer: Tokenizer, line: str, limit: int, number: int) -> list[int]:
    """A source to translate: whole, or cut to ``limit`` > 0 tokens with a warning naming the
    line, so no sentence loses its end without a word."""
    ids = tokenizer.encode(line)
    if 0 < limit < len(ids):
        log.warning("line %d: source of %d tokens cut to %d (max_source_tokens)", number,
                    len(ids), limit)
        ids = ids[:limit]
    return ids + [EOS]


def translate_lines(loaded: LoadedModel, lines: list[str], config: DecodeConfig,
                    strategy: str = "beam", keep_attention: bool = False,
                    first_line: int = 1) -> list[list[Hypothesis]]:
    """Translate a list of sentences; an empty line gives an empty hypothesis list. Sources are
    translated whole unless ``config.max_source_tokens`` cuts them (each cut is logged with its
    line number, ``lines[0]`` being line ``first_line``)."""
    keep = [i for i, line in enumerate(lines) if line.strip()]
    limit = config.max_source_tokens
    src_ids = [_source_ids(loaded.tokenizer, lines[i], limit, first_line + i) for i in keep]
    decoded = translate_ids(loaded.model, src_ids, config, loaded.device, strategy,
                            keep_attention)
    results: list[list[Hypothesis]] = [[] for _ in lines]
    for i, hyps in zip(keep, decoded, strict=True):
        results[i] = hyps
    return results


def _arrived_raw(fd: int, max_lines: int, pause: float) -> Iterator[list[bytes]]:
    """Raw lines of file descriptor ``fd`` in batches of what has arrived: a batch ends when
    ``max_lines`` are in hand, or when a line is in hand and nothing more comes for ``pause``
    seconds. A regular file or a busy pipe is always ready, so it fills whole batches."""
    lines: list[bytes] = []
    tail = b""  # an incomplete last line
    while True:
        if len(lines) >= max_lines:
            yield lines[:max_lines]
            lines = lines[max_lines:]
            continue
        ready, _, _ = select.select([fd], [], [], pause if lines else None)
        if not ready:
            yield lines
            lines = []
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *complete, tail = (tail + chunk).split(b"\n")
        lines.extend(complete)
    if tail:
        lines.append(tail)
    while lines:
        yield lines[:max_lines]
        lines = lines[max_lines:]


def read_batches(stream: BinaryIO, name: str, max_lines: int = STREAM_CHUNK_LINES,
                 pause: float = STREAM_PAUSE_S) -> Iterator[list[str]]:
    """Lines of a binary stream (without newlines) in batches of what has arrived, at most
    ``max_lines`` each (see :func:`_arrived_raw`); bad UTF-8 names the line. A stream without a
    file descriptor (an in-memory one) is read in batches of ``max_lines``."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None
    if fd is None:
        raw_batches: Iterator[list[bytes]] = chunked(stream, max_lines)
    else:
        raw_batches = _arrived_raw(fd, max_lines, pause)
    number = 0
    for raw in raw_batches:
        yield [decode_utf8(line, name, number + i).rstrip("\r\n")
               for i, line in enumerate(raw, start=1)]
        number += len(raw)


def translate_stream(loaded: LoadedModel, batches: Iterable[list[str]], config: DecodeConfig,
                     keep_attention: bool = False
                     ) -> Iterator[list[tuple[str, list[Hypothesis]]]]:
    """Translate batches of lines as they come (see :func:`read_batches`): per batch, the
    (input, hypotheses) of each line, in order. Memory stays bounded on endless input."""
    number = 1
    for batch in batches:
        results = translate_lines(loaded, batch, config, "beam", keep_attention, number)
        if loaded.device.type == "cpu":
            release_free_memory()
        number += len(batch)
        yield list(zip(batch, results, strict=True))


def generation_config(config: DecodeConfig, **overrides: object) -> DecodeConfig:
    """The recipe's decode settings with command-line values (None = keep) applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


@torch.inference_mode()
def generate(loaded: LoadedModel, prompt: str, config: DecodeConfig, num_samples: int = 1,
             seed: int = 0, on_text: Callable[[str], None] | None = None) -> list[str]:
    """Continue ``prompt`` with the character LM; ``on_text`` streams the first sample."""
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    prompt_ids = tokenizer.encode(prompt or "\n")
    rows = torch.tensor(prompt_ids, device=device).unsqueeze(0).expand(num_samples, -1)
    state = model.start(num_samples)
    if rows.size(1) > 1:
        _, state = model(rows[:, :-1], state)
    first = rows[:, -1].contiguous()
    max_lengths = torch.full((num_samples,), config.max_new_tokens, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    strategy = "greedy" if config.temperature == 0 else "sample"
    strategy = "beam" if config.beam_size > 1 else strategy
    stream = None
    if on_text is not None and num_samples == 1 and strategy != "beam":
        def stream(tokens: torch.Tensor) -> None:
            on_text(tokenizer.decode(tokens.tolist()[:1]))
    hyps = decode(model.step, state, first, max_lengths, config, strategy, generator=generator,
                  on_tokens=stream)
    return [prompt + tokenizer.decode(h.tokens) for per_input in hyps for h in per_input]


def best_text(tokenizer: Tokenizer, hypotheses: list[Hypothesis]) -> str:
    """The top hypothesis as text ('' for an empty input)."""
    return tokenizer.decode(hypotheses[0].tokens) if hypotheses else ""


def write_translations(loaded: LoadedModel, batches: Iterable[list[str]],
                       config: DecodeConfig, sink: TextIO, n_best: bool = False,
                       attention_dir: Path | None = None) -> int:
    """Stream translations of batches of lines to ``sink``, flushing after every batch; returns
    the number of inputs.

    One line per input, or with ``n_best`` the TSV ``index<TAB>rank<TAB>score<TAB>text`` for
    each of the n best hypotheses (an empty input gives one row with score 0 and no text).
    ``attention_dir`` gets one heatmap PNG per sentence.
    """
    if attention_dir is not None:
        attention_dir.mkdir(parents=True, exist_ok=True)
    index = 0
    for batch in translate_stream(loaded, batches, config, attention_dir is not None):
        for line, hyps in batch:
            _write_one(loaded.tokenizer, sink, index, line, hyps, config.n_best if n_best else 0,
                       attention_dir)
            index += 1
        sink.flush()
    return index


def _write_one(tokenizer: Tokenizer, sink: TextIO, index: int, line: str, hyps: list[Hypothesis],
               n_best: int, attention_dir: Path | None) -> None:
    """One input's output: its best line, or ``n_best`` > 0 TSV rows; and its heatmap."""
    if n_best:
        for rank, hyp in enumerate(hyps[:n_best] or [Hypothesis([], 0.0, 0.0)], 1):
            sink.write(f"{index}\t{rank}\t{hyp.score:.4f}\t{tokenizer.decode(hyp.tokens)}\n")
    else:
        sink.write(best_text(tokenizer, hyps) + "\n")
    if attention_dir is not None and hyps and hyps[0].attention is not None:
        from seq2seq.plot import attention_heatmap

        attention_heatmap(attention_dir / f"{index:06d}.png", tokenizer, line, hyps[0])
