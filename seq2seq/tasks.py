"""What differs between translation and the character LM during training.

A task reads and encodes its data, hands out micro-batches forever (advancing the epoch), computes
the summed loss of one micro-batch, validates, and saves/restores its data position. The trainer
in ``train.py`` sees only this interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from seq2seq import corpus, data
from seq2seq import distributed as dist
from seq2seq.config import Recipe
from seq2seq.distributed import DistContext
from seq2seq.evaluate import perplexity, score_corpus
from seq2seq.inference import encode_source, translate_ids
from seq2seq.model.loss import token_losses
from seq2seq.tokenizer import EOS, CharTokenizer, SentencePieceTokenizer, Tokenizer


def _columns(model: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """Target ids -> the logit columns of a model that may score a target vocabulary only."""
    return getattr(model, "module", model).output.positions(target)


class Task(Protocol):
    @property
    def epoch(self) -> int: ...
    @property
    def steps_per_epoch(self) -> int: ...

    def tokenizer_texts(self) -> Iterator[str]: ...
    def encode(self, tokenizer: Tokenizer, cache_dir: Path) -> None: ...
    def output_vocabulary(self) -> torch.Tensor | None: ...
    def next_step(self) -> list[Any]: ...
    def target_tokens(self, batch: Any) -> int: ...
    def all_tokens(self, batch: Any) -> int: ...
    def loss(self, model: nn.Module, batch: Any,
             smoothing: float) -> tuple[torch.Tensor, torch.Tensor]: ...
    def validate(self, model: nn.Module, recipe: Recipe) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _cached(ctx: DistContext, entry: Path, inputs: dict[str, Any], build: Any) -> dict[str, Any]:
    """The manifest of ``entry``, built first where needed: by rank 0, then by the first rank
    of each node that does not see it (a cache directory that is not shared), while the
    others wait."""
    for builder in (ctx.is_main, ctx.local_rank == 0 and not ctx.is_main):
        if builder and corpus.read_manifest(entry, inputs) is None:
            build()
        dist.barrier()
    manifest = corpus.read_manifest(entry, inputs)
    if manifest is None:
        raise data.DataError(f"{entry}: the encoded corpus is missing; check that "
                             "data.cache_dir is writable")
    return manifest


class TranslationTask:
    """Parallel text in length-bucketed token-budget batches, sharded over ranks. The training
    pairs are read as a stream and encoded once into a memory-mapped cache (seq2seq.corpus)."""

    def __init__(self, recipe: Recipe, ctx: DistContext):
        self.recipe, self.ctx = recipe, ctx

    def _train_pairs(self) -> Iterator[tuple[str, str]]:
        return data.iter_parallel(self.recipe.data, "train", seed=self.recipe.train.seed)

    def tokenizer_texts(self) -> Iterator[str]:
        for source, target in self._train_pairs():
            yield source
            yield target

    def _encode_train(self, tokenizer: Tokenizer, cache_dir: Path) -> data.ParallelData:
        """The training pairs from the cache, encoded into it first when needed."""
        recipe, max_length = self.recipe, self.recipe.data.max_length
        inputs = corpus.built_from(tokenizer, data.source_key(recipe.data, "train",
                                                              recipe.train.seed),
                                   max_length=max_length)
        entry = corpus.entry_dir(cache_dir, "pairs", inputs)

        def build() -> None:
            files = [Path(f[0]) for f in inputs["source"].get("files", [])]
            needed = corpus.text_bytes(files) * 3 // 2  # int32 ids at >= 3 bytes of text each
            corpus.build_parallel(entry, inputs, self._train_pairs(), tokenizer, max_length,
                                  needed)

        manifest = _cached(self.ctx, entry, inputs, build)
        self._target_ids = manifest["target_ids"]
        return corpus.open_parallel(entry, manifest)

    def encode(self, tokenizer: Tokenizer, cache_dir: Path) -> None:
        self.tokenizer = tokenizer
        max_length, config = self.recipe.data.max_length, self.recipe.train
        self.train = self._encode_train(tokenizer, cache_dir)  # first: its errors come first
        self.valid_pairs = data.read_parallel(self.recipe.data, "valid", seed=config.seed)
        if self.recipe.tokenizer.sampling_alpha > 0:  # re-segmenting needs the text each epoch
            self.train_pairs = data.read_parallel(self.recipe.data, "train", config.seed)
        self.valid = data.encode_pairs(self.valid_pairs, tokenizer, max_length)
        # One optimizer step takes world_size * accumulate consecutive batches of similar length;
        # micro-batch j of rank r is "virtual rank" r * accumulate + j. So one process with
        # accumulation sees exactly the batches that several processes see together.
        shards = self.ctx.world_size * config.accumulate
        self.samplers = [
            data.TokenBatchSampler(self.train.src_lengths, self.train.tgt_lengths,
                                   config.max_tokens, seed=config.seed, shuffle=True,
                                   rank=self.ctx.rank * config.accumulate + j, world_size=shards)
            for j in range(config.accumulate)]
        self._steps_per_epoch = len(self.samplers[0])
        self.best_train, self._sampled_epoch = self.train, -1
        self._iterators: list[Iterator[list[int]]] = []  # made by the first next_step

    def _start_epoch(self) -> None:
        """Iterators from the samplers' epoch and position on; with subword sampling, first
        that epoch's segmentation of the training pairs, a function of (train.seed, epoch)
        only, so every rank and every resume sees the same one (and the same epoch length)."""
        config, epoch = self.recipe.tokenizer, self.samplers[0].epoch
        if config.sampling_alpha > 0 and epoch != self._sampled_epoch:
            assert isinstance(self.tokenizer, SentencePieceTokenizer)  # checked by the recipe
            self.train = data.sample_pairs(
                self.train_pairs, self.best_train, self.tokenizer, config.sampling_alpha,
                config.sampling_nbest, self.recipe.train.seed * 1_000_003 + epoch,
                self.recipe.data.max_length)
            for sampler in self.samplers:
                sampler.set_lengths(self.train.src_lengths, self.train.tgt_lengths)
            self._sampled_epoch, self._steps_per_epoch = epoch, len(self.samplers[0])
        self._iterators = [iter(sampler) for sampler in self.samplers]

    @property
    def epoch(self) -> int:
        return self.samplers[0].epoch

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    def next_step(self) -> list[data.Batch]:
        """The micro-batches of the next optimizer step (a new epoch starts when one ends)."""
        indices = [next(iterator, None) for iterator in self._iterators]
        if not indices or indices[0] is None:
            self._start_epoch()
            indices = [next(iterator) for iterator in self._iterators]
        return [data.collate(self.train, i).to(self.ctx.device) for i in indices]

    def target_tokens(self, batch: data.Batch) -> int:
        return batch.num_tgt_tokens

    def all_tokens(self, batch: data.Batch) -> int:
        return batch.num_src_tokens + batch.num_tgt_tokens

    def output_vocabulary(self) -> torch.Tensor:
        """The ids the training targets use (EOS included): the model's target vocabulary.
        Counted once, when the corpus was encoded (its manifest keeps them)."""
        return torch.tensor(sorted({*self._target_ids, EOS}), dtype=torch.long)

    def loss(self, model: nn.Module, batch: data.Batch,
             smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch.src, batch.src_lengths, batch.tgt_in,
                     targets=_columns(model, batch.tgt_out), smoothing=smoothing)

    @torch.inference_mode()
    def validate(self, model: nn.Module, recipe: Recipe) -> dict[str, Any]:
        """Per-token NLL and perplexity, and BLEU of greedy output on the validation set."""
        model.eval()
        nll, tokens = 0.0, 0
        sampler = data.TokenBatchSampler(self.valid.src_lengths, self.valid.tgt_lengths,
                                         recipe.train.max_tokens, seed=0, shuffle=False)
        for indices in sampler:
            batch = data.collate(self.valid, indices).to(self.ctx.device)
            nll += model(batch.src, batch.src_lengths, batch.tgt_in,
                         targets=_columns(model, batch.tgt_out))[1].item()
            tokens += batch.num_tgt_tokens
        sources = [encode_source(self.tokenizer, s, recipe.data.max_length)
                   for s, _ in self.valid_pairs]
        hyps = translate_ids(model, sources, recipe.decode, self.ctx.device, strategy="greedy")
        texts = [self.tokenizer.decode(h[0].tokens) if h else "" for h in hyps]
        scores = score_corpus(texts, [t for _, t in self.valid_pairs])
        model.train()
        loss = nll / max(tokens, 1)
        return {"loss": loss, "ppl": perplexity(loss), "bleu": scores["bleu"],
                "chrf": scores["chrf"]}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.samplers[0].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for sampler in self.samplers:
            sampler.load_state_dict(state["sampler"])
        self._iterators = []


class LanguageModelTask:
    """One text cut into parallel streams; the LM state carries across chunks (truncated BPTT)."""

    def __init__(self, recipe: Recipe, ctx: DistContext):
        self.recipe, self.ctx = recipe, ctx
        data.split_text("", recipe.data.valid_fraction)  # a bad fraction fails here
        self.carry: Any = None
        self.saved_carry: dict[str, torch.Tensor] | None = None

    def tokenizer_texts(self) -> Iterator[str]:
        """The training part of the text (all but the last valid_fraction of its characters),
        in chunks: a first pass counts the characters."""
        total = sum(len(chunk) for chunk in data.iter_lm_text(self.recipe.data))
        left = total - round(total * self.recipe.data.valid_fraction)
        for chunk in data.iter_lm_text(self.recipe.data):
            if left <= 0:
                return
            yield chunk[:left]
            left -= len(chunk)

    def output_vocabulary(self) -> None:
        """The LM predicts its whole vocabulary."""
        return None

    def _encode_text(self, tokenizer: Tokenizer, cache_dir: Path) -> tuple[Any, Any]:
        """(train ids, valid ids): for characters, views of the cached, memory-mapped ids of
        the whole text (one id per character, so the split by characters is a split of the
        ids); other tokenizers encode the two parts in memory."""
        recipe = self.recipe
        if not isinstance(tokenizer, CharTokenizer):
            train_text, valid_text = data.split_text(data.read_text(recipe.data),
                                                     recipe.data.valid_fraction)
            return (torch.tensor(tokenizer.encode(train_text)),
                    torch.tensor(tokenizer.encode(valid_text)))
        inputs = corpus.built_from(tokenizer, data.source_key(recipe.data, "text"))
        entry = corpus.entry_dir(cache_dir, "text", inputs)

        def build() -> None:
            files = [Path(f[0]) for f in inputs["source"].get("files", [])]
            needed = corpus.text_bytes(files) * np.dtype(tokenizer.dtype).itemsize
            corpus.build_text(entry, inputs, data.iter_lm_text(recipe.data), tokenizer, needed)

        ids = corpus.open_text(entry, _cached(self.ctx, entry, inputs, build))
        cut = len(ids) - round(len(ids) * recipe.data.valid_fraction)
        return ids[:cut], ids[cut:]

    def encode(self, tokenizer: Tokenizer, cache_dir: Path) -> None:
        config, world = self.recipe.train, self.ctx.world_size
        self.train_ids, self.valid_ids = self._encode_text(tokenizer, cache_dir)
        # Every rank walks the same stream and takes its own rows: disjoint text per rank.
        self.stream = data.LMStream(self.train_ids, config.batch_size * world, config.bptt)
        self._chunks = iter(self.stream)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.stream) // self.recipe.train.accumulate)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``accumulate`` consecutive chunks; the state carries from one to the next."""
        return [self._next_chunk() for _ in range(self.recipe.train.accumulate)]

    def _next_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = next(self._chunks, None)
        if chunk is None:  # the epoch ended: start again from the top with a fresh state
            self.carry = None
            self._chunks = iter(self.stream)
            chunk = next(self._chunks)
        rows = slice(self.ctx.rank * self.recipe.train.batch_size,
                     (self.ctx.rank + 1) * self.recipe.train.batch_size)
        return chunk[0][rows].to(self.ctx.device), chunk[1][rows].to(self.ctx.device)

    def target_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[1].numel()

    def all_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[1].numel()

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.carry is None and self.saved_carry is not None:  # first chunk after a resume
            template = getattr(model, "module", model).start(batch[0].size(0))
            self.carry = dataclasses.replace(template, **self.saved_carry)
            self.saved_carry = None
        logits, state = model(batch[0], self.carry)
        self.carry = state.detach()
        return token_losses(logits, batch[1], smoothing)

    @torch.inference_mode()
    def validate(self, model: nn.Module, recipe: Recipe) -> dict[str, Any]:
        """NLL per character over the held-out end of the text."""
        model.eval()
        stream = data.LMStream(self.valid_ids, recipe.train.batch_size, recipe.train.bptt)
        nll, tokens, state = 0.0, 0, None
        for inputs, targets in stream:
            logits, state = model(inputs.to(self.ctx.device), state)
            nll += token_losses(logits, targets.to(self.ctx.device), 0.0)[1].item()
            tokens += targets.numel()
        model.train()
        loss = nll / max(tokens, 1)
        return {"loss": loss, "ppl": perplexity(loss)}

    def state_dict(self) -> dict[str, Any]:
        carry = None
        if self.carry is not None and self.stream.position > 0:  # at an epoch start it resets
            carry = {f.name: getattr(self.carry, f.name) for f in dataclasses.fields(self.carry)}
        return {"stream": self.stream.state_dict(), "carry": carry}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self._chunks = iter(self.stream)
        self.carry, self.saved_carry = None, state["carry"]


def make_task(recipe: Recipe, ctx: DistContext) -> Task:
    """The task the recipe's ``data.task`` names."""
    if recipe.data.task == "lm":
        return LanguageModelTask(recipe, ctx)
    return TranslationTask(recipe, ctx)
