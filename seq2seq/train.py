"""The training loop: one code path for translation and the character LM, one process or many.

Budgets (steps, minutes, epochs) stop training, then it validates and saves. Each optimizer step
normalises the summed loss by the global number of target tokens, so gradient accumulation and
DistributedDataParallel give the same update as one process with the same global batch.

Under DDP every decision that ends or shapes training is taken once and shared: rank 0's clock
drives the time budget and the schedule, rank 0's validation drives patience, and a non-finite
loss on any rank skips the step on all. So the ranks stop together and step with the same
learning rate. Dropout differs per rank (seed + rank), and each rank's RNG is checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seq2seq import checkpoint as ckpt
from seq2seq import distributed as dist
from seq2seq.config import Recipe, TrainConfig, recipe_to_dict, recipe_to_toml
from seq2seq.events import LogCallback, LogWindow, TensorBoardSink, fan_out, summary_writer_class
from seq2seq.files import atomic_write
from seq2seq.inference import load_model
from seq2seq.model import build_model
from seq2seq.model.recurrent import bound_primitive_cache
from seq2seq.tasks import Task, make_task
from seq2seq.tokenizer import (
    Tokenizer,
    coverage,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_bytes,
    train_tokenizer,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, a run directory that cannot be resumed)."""


@dataclass
class Progress:
    """Loop bookkeeping saved in every checkpoint."""

    step: int = 0
    elapsed: float = 0.0  # seconds spent training, across resumes
    best: float | None = None
    bad_validations: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


def budget_fraction(config: TrainConfig, step: int, elapsed: float,
                    steps_per_epoch: int = 0) -> float:
    """How much of the training budget is spent: the largest of the step, time and epoch
    fractions (the epoch budget counts ``steps_per_epoch`` optimizer steps per epoch)."""
    fractions = [0.0]
    if config.max_steps:
        fractions.append(step / config.max_steps)
    if config.max_minutes:
        fractions.append(elapsed / (60.0 * config.max_minutes))
    if config.max_epochs and steps_per_epoch:
        fractions.append(step / (steps_per_epoch * config.max_epochs))
    return max(fractions)


def learning_rate(config: TrainConfig, step: int, fraction: float) -> float:
    """Linear warm-up, then the schedule the recipe names.

    Warm-up ends after ``warmup_steps`` or, when ``warmup_fraction`` is set, at that fraction of
    the budget, whichever comes first: a slow machine that makes few steps in its budget does not
    spend a large part of them warming up, and a fast one still warms up for its full steps.
    gnmt: constant, then ``decay_halvings`` halvings spread evenly over the budget after
    ``decay_start``; inverse_sqrt: lr * sqrt(warmup / step) after warm-up.
    """
    warmup = max(config.warmup_steps, 1)
    warmed = (step + 1) / warmup
    if config.warmup_fraction > 0:
        warmed = max(warmed, fraction / config.warmup_fraction)
    if warmed < 1:
        return config.lr * warmed
    if config.schedule == "inverse_sqrt":
        return config.lr * math.sqrt(warmup / (step + 1))
    if config.schedule == "gnmt" and fraction > config.decay_start and config.decay_halvings:
        width = (1.0 - config.decay_start) / config.decay_halvings
        halvings = min(int((fraction - config.decay_start) / width) + 1, config.decay_halvings)
        return config.lr * 0.5**halvings
    return config.lr


def matmul_peak_flops(device: torch.device, seconds: float = 0.5, size: int = 2048) -> float:
    """The fp32 matmul peak of this device, the one reference for every MFU the project reports
    (the trainer's log and the benchmarks): the fastest of repeated ``size`` x ``size`` products,
    timed one by one for ``seconds`` (at least three) after one untimed product. The fastest, not
    the mean, because boost clocks and a busy neighbour only ever slow a product down."""
    generator = torch.Generator(device=device).manual_seed(0)  # leave the training RNG alone
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, spent, count = float("inf"), 0.0, 0
    while spent < seconds or count < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        took = time.perf_counter() - start
        best, spent, count = min(best, took), spent + took, count + 1
    return 2.0 * size**3 / best


def prepare_tokenizer(recipe: Recipe, out_dir: Path, texts: Callable[[], Iterator[str]],
                      ctx: dist.DistContext) -> Tokenizer:
    """The run directory's tokenizer, trained on rank 0 first when there is none, and sent to
    every rank (other nodes need not see the run directory)."""
    shared = None
    if ctx.is_main:
        tokenizer = load_tokenizer(out_dir)
        if tokenizer is None:
            started = time.perf_counter()
            tokenizer = train_tokenizer(texts(), recipe.tokenizer)
            save_tokenizer(tokenizer, out_dir)
            log.info("trained a %s tokenizer with %d entries in %.1f s", tokenizer.kind,
                     tokenizer.vocab_size, time.perf_counter() - started)
        shared = (tokenizer.kind, tokenizer.to_bytes())
    kind, data = dist.broadcast_object(shared)
    return tokenizer_from_bytes(kind, data)


def corpus_cache(recipe: Recipe, out_dir: Path) -> Path:
    """Where encoded corpora live: data.cache_dir (shared by runs; keyed by tokenizer and
    files) or, by default, the run directory."""
    return Path(recipe.data.cache_dir) if recipe.data.cache_dir else out_dir / "corpus"


def build_tokenizer(recipe: Recipe, out_dir: str | Path) -> tuple[Path, int, float]:
    """Train the recipe's tokenizer into ``out_dir``: (path, vocabulary size, coverage).

    Coverage is the fraction of non-UNK tokens on the training text.
    """
    task = make_task(recipe, dist.DistContext(0, 1, 0, torch.device("cpu")))
    tokenizer = train_tokenizer(task.tokenizer_texts(), recipe.tokenizer)
    path = save_tokenizer(tokenizer, out_dir)
    return path, tokenizer.vocab_size, coverage(tokenizer, task.tokenizer_texts())


class Trainer:
    """Owns the model, optimizer and task for one run; ``run()`` trains until a budget ends."""

    def __init__(self, recipe: Recipe, out_dir: Path, ctx: dist.DistContext, task: Task,
                 tokenizer: Tokenizer, on_log: LogCallback | None = None):
        self.recipe, self.config, self.out_dir, self.ctx = recipe, recipe.train, out_dir, ctx
        self.task, self.tokenizer, self.on_log = task, tokenizer, on_log
        torch.manual_seed(self.config.seed)  # the same initial weights on every rank
        self.model = build_model(recipe.model, tokenizer.vocab_size, recipe.data.task)
        torch.manual_seed(self.config.seed + ctx.rank)  # dropout masks differ between ranks
        if recipe.model.target_vocabulary:
            self.model.output.restrict(task.output_vocabulary())
        self.model.to(ctx.device)
        self.ddp: nn.Module = self.model
        if ctx.world_size > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        optimizer = torch.optim.AdamW if self.config.weight_decay else torch.optim.Adam
        # One fused kernel over all parameters instead of a handful of passes per tensor.
        fused = ctx.device.type in ("cpu", "cuda")
        self.optimizer = optimizer(self.model.parameters(), lr=self.config.lr, betas=(0.9, 0.98),
                                   weight_decay=self.config.weight_decay, fused=fused)
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.progress = Progress()
        self.nonfinite_in_row = 0
        self.peak_flops = 0.0

    def _autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast on GPU by default; CPU trains in fp32."""
        precision = self.config.precision
        if self.ctx.device.type != "cuda" or precision == "fp32":
            return None
        return torch.float16 if precision == "fp16" else torch.bfloat16

    # -- checkpoints -------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION,
            "recipe": recipe_to_dict(self.recipe), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),  # the schedule is a function of step
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(),
            "rng_ranks": dist.all_gather_object(ckpt.rng_state()),
            "step": self.progress.step,  # the epoch is in data_position
            "elapsed": self.progress.elapsed, "best": self.progress.best,
            "bad_validations": self.progress.bad_validations,
            "data_position": self.task.state_dict(), "metrics": self.progress.metrics,
            "tokenizer": {"kind": self.tokenizer.kind, "data": self.tokenizer.to_bytes()},
            "vocab_size": self.tokenizer.vocab_size,
        }

    def restore(self, path: Path) -> None:
        """Continue exactly where ``path`` stopped: weights, optimizer, RNG, data position."""
        payload = ckpt.load_checkpoint(path, map_location=self.ctx.device)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload.get("scaler", {}))
        self.task.load_state_dict(payload["data_position"])
        self.progress = Progress(payload["step"], payload["elapsed"], payload["best"],
                                 payload["bad_validations"], payload["metrics"])
        ranks = payload.get("rng_ranks") or [payload["rng"]]
        if len(ranks) == self.ctx.world_size:
            ckpt.set_rng_state(ranks[self.ctx.rank])
        else:  # another world size: still reproducible, and still different per rank
            ckpt.set_rng_state(payload["rng"])
            torch.manual_seed(self.config.seed + self.ctx.rank + self.progress.step)
            log.info("the checkpoint holds the RNG of %d ranks, not %d: reseeded from the step",
                     len(ranks), self.ctx.world_size)
        log.info("resumed from %s at step %d", path, self.progress.step)

    def warm_start(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        """Start from a checkpoint's weights with this run's fresh optimizer and step 0. The
        target vocabulary (``output.target_mask``) stays this run's, from its own data."""
        def trainable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v for k, v in state.items() if k != "output.target_mask"}

        weights = trainable(weights)
        fix = "set the recipe's model.* keys (and data.task) as in the checkpoint's recipe"
        ckpt.check_weights_fit(path, weights, trainable(self.model.state_dict()), fix)
        self.model.load_state_dict(weights, strict=False)
        log.info("initialised from the weights of %s; optimizer and schedule start at step 0",
                 path)

    def save(self, is_best: bool) -> None:
        """Rank 0 writes; every rank calls this (it gathers the ranks' RNG states)."""
        payload = self.payload()
        if not self.ctx.is_main:
            return
        ckpt.save_checkpoint(self.out_dir / "last.pt", payload)
        if is_best:
            ckpt.save_checkpoint(self.out_dir / "best.pt", payload)
        if self.config.keep_last:
            ckpt.save_checkpoint(self.out_dir / f"step_{self.progress.step}.pt", payload)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_last)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, micro_batches: list[Any]) -> dict[str, float]:
        """Forward/backward over the micro-batches, then one clipped optimizer update."""
        self.ddp.train()
        target_tokens = float(sum(self.task.target_tokens(b) for b in micro_batches))
        # Normalise by the global token count; DDP averages over ranks, so scale it back up.
        scale = self.ctx.world_size / dist.all_reduce_sum([target_tokens])[0]
        totals = torch.zeros(4)  # loss, nll, target tokens, source + target tokens
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            skip_sync = not last and self.ctx.world_size > 1
            sync = self.ddp.no_sync() if skip_sync else contextlib.nullcontext()
            autocast = torch.autocast(self.ctx.device.type, enabled=self.autocast_dtype is not None,
                                      dtype=self.autocast_dtype or torch.float32)
            with sync, autocast:
                loss, nll = self.task.loss(self.ddp, batch, self.config.label_smoothing)
                self.scaler.scale(loss * scale).backward()
            totals += torch.tensor([loss.item(), nll.item(), self.task.target_tokens(batch),
                                    self.task.all_tokens(batch)])
        return self._update(totals)

    def _update(self, totals: torch.Tensor) -> dict[str, float]:
        """Clip and step, or skip the step on every rank when any rank saw a non-finite loss."""
        self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        finite = math.isfinite(totals[0].item()) and bool(torch.isfinite(norm))
        lr = learning_rate(self.config, self.progress.step, self.budget_spent())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        any_bad = dist.all_reduce_sum([0.0 if finite else 1.0])[0] > 0
        if any_bad and self.autocast_dtype != torch.float16:
            self.nonfinite_in_row += 1
            log.warning("non-finite loss or gradient at step %d: skipping the update (%d in a row)",
                        self.progress.step, self.nonfinite_in_row)
            if self.nonfinite_in_row >= self.config.max_nonfinite:
                raise TrainingError(f"{self.nonfinite_in_row} non-finite losses in a row; lower "
                                    "train.lr or check the data")
        else:
            self.nonfinite_in_row = 0
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss, nll, target_tokens, tokens = totals.tolist()
        return {"loss": loss / max(target_tokens, 1.0), "nll": nll / max(target_tokens, 1.0),
                "target_tokens": target_tokens, "tokens": tokens, "lr": lr,
                "grad_norm": float(norm)}

    # -- the loop ----------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        """Record an event in metrics.jsonl and pass it to the caller's progress display."""
        if not self.ctx.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
        if self.on_log is not None:
            self.on_log(event)

    def budget_spent(self) -> float:
        """The fraction of the step, time or epoch budget spent (drives the schedule); the same
        on every rank, since step, epoch and (rank 0's) elapsed time are."""
        return budget_fraction(self.config, self.progress.step, self.progress.elapsed,
                               self.task.steps_per_epoch)

    def stop_reason(self) -> str | None:
        """The one place that decides whether training ends, and why: a step, epoch or time
        budget spent, or patience run out (None: go on). Its inputs are the same on every rank
        (step, epoch, rank 0's clock, the validation results rank 0 shared), so all ranks stop
        at the same step. Too many non-finite steps in a row is an error, raised where the
        shared count is kept (``_update``)."""
        config, progress = self.config, self.progress
        if config.max_steps and progress.step >= config.max_steps:
            return f"{config.max_steps} steps done"
        if config.max_epochs and self.task.epoch >= config.max_epochs:
            return f"{config.max_epochs} epochs done"
        if config.max_minutes and progress.elapsed >= 60.0 * config.max_minutes:
            return f"{config.max_minutes:g} minutes of training done"
        if config.patience and progress.bad_validations >= config.patience:
            return f"no improvement in {config.patience} validations"
        return None

    def validate(self) -> dict[str, Any]:
        """Validation metrics on rank 0, shared with every rank with the patience count, so
        that all ranks stop on the same validation; keeps best.pt."""
        progress, improved = self.progress, False
        if self.ctx.is_main:
            metrics = self.task.validate(self.model, self.recipe)
            key = self.config.valid_metric if self.config.valid_metric in metrics else "loss"
            value = metrics[key] if key == "bleu" else -metrics[key]
            improved = progress.best is None or value > progress.best
            if improved:
                progress.best, progress.bad_validations = value, 0
            else:
                progress.bad_validations += 1
            progress.metrics = metrics
        shared = (progress.best, progress.bad_validations, progress.metrics, improved)
        progress.best, progress.bad_validations, progress.metrics, improved = \
            dist.broadcast_object(shared)
        self.save(is_best=improved)
        self.emit({"event": "valid", "step": progress.step, **progress.metrics})
        return progress.metrics

    def log_train(self, window: LogWindow, lr: float) -> None:
        """One train event: the interval's mean loss, nll and gradient norm (this rank's
        batches), the last learning rate, and the tokens of every rank with their rate."""
        rate = window.tokens / (time.perf_counter() - window.started)
        flops = getattr(self.model, "flops_per_token", lambda: 0.0)()
        self.emit({"event": "train", "step": self.progress.step, "epoch": self.task.epoch,
                   **window.means(), "tokens": window.tokens, "lr": lr, "tokens_per_s": rate,
                   "elapsed_min": self.progress.elapsed / 60, "budget": self.budget_spent(),
                   "mfu": flops * rate / self.peak_flops if self.peak_flops else None})

    def run(self) -> dict[str, Any]:
        """Train until a budget or patience runs out, validating at the interval and at the end."""
        if self.ctx.device.type == "cpu" and self.ctx.is_main:
            # tokens/s counts every rank's tokens, so MFU is against every rank's peak: rank 0's
            # probe times the number of processes (torchrun starts them alike, same threads)
            peak = matmul_peak_flops(self.ctx.device)
            self.peak_flops = peak * self.ctx.world_size
            log.info("fp32 matmul peak %.1f GFLOP/s on %d threads, x %d processes (MFU is "
                     "against the sum)", peak / 1e9, torch.get_num_threads(), self.ctx.world_size)
        window = LogWindow()
        while (reason := self.stop_reason()) is None:
            started = time.perf_counter()
            stats = self.train_step(self.task.next_step())
            self.progress.step += 1
            # rank 0's clock for all: the time budget and the schedule decide alike everywhere
            self.progress.elapsed = dist.from_main(
                [self.progress.elapsed + time.perf_counter() - started])[0]
            window.add(stats, self.ctx.world_size)
            if self.progress.step % self.config.log_every == 0:
                self.log_train(window, stats["lr"])
                window = LogWindow()
            paused = time.perf_counter()
            if self.progress.step % self.config.valid_every == 0:
                self.validate()
            elif self.config.save_every and self.progress.step % self.config.save_every == 0:
                self.save(is_best=False)
            window.started += time.perf_counter() - paused  # keep validation out of tokens/s
        log.info("stopping at step %d: %s", self.progress.step, reason)
        if self.progress.step % self.config.valid_every != 0:
            self.validate()
        return self.progress.metrics


def _attach_log_file(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("seq2seq").addHandler(handler)
    logging.getLogger("seq2seq").setLevel(logging.INFO)
    return handler


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False,
          on_log: LogCallback | None = None,
          init_from: str | Path | None = None) -> dict[str, Any]:
    """Train what the recipe describes into ``out_dir``; returns the last validation metrics.

    ``init_from`` warm-starts from a checkpoint: its weights and its tokenizer (the recipe's
    tokenizer section becomes the checkpoint's), with a fresh optimizer and schedule at step 0.
    """
    bound_primitive_cache()
    out_dir = Path(out_dir)
    if init_from is not None and resume:
        raise TrainingError("--init-from starts a new run from a checkpoint's weights; it "
                            "cannot be combined with --resume")
    if resume and not (out_dir / "last.pt").exists():  # before any heavy work
        raise TrainingError(f"{out_dir / 'last.pt'}: nothing to resume; start without --resume")
    warm = None
    if init_from is not None:
        warm = load_model(init_from)  # the checkpoint's recipe, weights and tokenizer
        recipe = dataclasses.replace(recipe, tokenizer=warm.recipe.tokenizer)
    if recipe.train.tensorboard:
        summary_writer_class()  # a missing package fails here, before anything is written
    try:
        ctx = dist.init_distributed(recipe.train.device)
    except dist.DistributedError as error:
        raise TrainingError(str(error)) from None
    if recipe.train.threads and ctx.device.type == "cpu":
        torch.set_num_threads(recipe.train.threads)
    handler = sink = None
    try:
        if ctx.is_main:
            if not resume and (out_dir / "last.pt").exists():
                raise TrainingError(f"{out_dir} already holds a run; pass --resume to continue it "
                                    "or choose another --out")
            out_dir.mkdir(parents=True, exist_ok=True)
            handler = _attach_log_file(out_dir)
            with atomic_write(out_dir / "recipe.toml", "w", encoding="utf-8") as handle:
                handle.write(recipe_to_toml(recipe))
            if warm is not None:
                save_tokenizer(warm.tokenizer, out_dir)
            sink = TensorBoardSink(out_dir) if recipe.train.tensorboard else None
        task = make_task(recipe, ctx)
        tokenizer = prepare_tokenizer(recipe, out_dir, task.tokenizer_texts, ctx)
        task.encode(tokenizer, corpus_cache(recipe, out_dir))
        trainer = Trainer(recipe, out_dir, ctx, task, tokenizer, fan_out(on_log, sink))
        if resume:
            trainer.restore(out_dir / "last.pt")
        if warm is not None:
            trainer.warm_start(warm.model.state_dict(), Path(init_from))
        metrics = trainer.run()
        # Leave the group together: rank 0 may still be saving while the others reach the
        # teardown, and a gloo group torn down under a peer's traffic can abort that peer.
        dist.barrier()
        return metrics
    finally:
        if sink is not None:
            sink.close()
        if handler is not None:
            logging.getLogger("seq2seq").removeHandler(handler)
            handler.close()
        dist.shutdown()
