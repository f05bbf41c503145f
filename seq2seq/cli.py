"""Command line: a thin Typer layer that parses options and calls library functions.

User mistakes (bad recipe, bad data, bad checkpoint, bad option) print one line and exit with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from seq2seq.checkpoint import CheckpointError
from seq2seq.config import ConfigError, load_recipe
from seq2seq.data import DataError
from seq2seq.heap import retain_freed_memory
from seq2seq.tokenizer import TokenizerError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="GNMT-style LSTM translation and character-level language models.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Build tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: a.b=value")]
Checkpoint = Annotated[Path, typer.Argument(help="A checkpoint written by seq2seq train")]
Checkpoints = Annotated[list[Path], typer.Argument(
    help="Checkpoints written by seq2seq train; several (sharing a tokenizer) form an ensemble")]
MaxSourceTokens = Annotated[int | None, typer.Option(
    help="Cut longer sources, with a warning naming each cut line (0 = never)")]
MaxRows = Annotated[int | None, typer.Option(
    help="Decoding rows (sentences x beam) per batch (0 = no limit)")]
Workers = Annotated[int | None, typer.Option(
    help="CPU: batches decoded side by side, one thread each (0 = one per thread, at most 4)")]


def _user_errors() -> tuple[type[Exception], ...]:
    from seq2seq.inference import InferenceError
    from seq2seq.train import TrainingError

    return ConfigError, DataError, TokenizerError, CheckpointError, InferenceError, TrainingError


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, console=_console())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner swaps it)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _setup_warnings() -> None:
    """Decoding commands: only warnings (a cut source line), plainly on stderr."""
    handler = _StderrHandler()
    handler.setLevel(logging.WARNING)  # whatever level a logger was given elsewhere
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def _console():  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    return Console(stderr=True)


def _run(action: Any) -> Any:
    """Call ``action`` turning user errors into one line and exit code 2."""
    try:
        return action()
    except _user_errors() as error:
        _fail(error)
    except BrokenPipeError:
        raise typer.Exit(code=0) from None


@app.command()
def train(recipe: Annotated[Path, typer.Argument(help="Recipe file (recipes/*.toml)")],
          out: Annotated[Path, typer.Option(help="Run directory")],
          set_: Sets = None,
          resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt")] = False,
          init_from: Annotated[Path | None, typer.Option(
              help="Start from this checkpoint's weights and tokenizer (fresh optimizer, step 0)",
          )] = None) -> None:
    """Train a translation model or character LM; writes OUT/{best,last}.pt, metrics.jsonl."""
    from seq2seq.progress import TrainingProgress
    from seq2seq.train import train as run_training

    _setup_logging()
    config = _run(lambda: load_recipe(recipe, set_))
    with TrainingProgress(config.train, _console()) as progress:
        metrics = _run(lambda: run_training(config, out, resume=resume, on_log=progress.update,
                                            init_from=init_from))
    if metrics:
        typer.echo(json.dumps({"run": str(out), **metrics}))


@tokenizer_app.command("train")
def tokenizer_train(recipe: Annotated[Path, typer.Argument(help="Recipe file")],
                    out: Annotated[Path, typer.Option(help="Run directory")],
                    set_: Sets = None) -> None:
    """Train the recipe's tokenizer into OUT; prints its vocabulary size and coverage."""
    from seq2seq.train import build_tokenizer

    _setup_logging()
    config = _run(lambda: load_recipe(recipe, set_))
    path, size, coverage = _run(lambda: build_tokenizer(config, out))
    typer.echo(f"{path}: {size} entries, coverage {coverage:.4%} of training tokens")


def _decode_options(loaded: Any, **options: Any) -> Any:
    from seq2seq.inference import check_decode_options, generation_config

    config = generation_config(loaded.recipe.decode, **options)
    check_decode_options(config)
    return config


@app.command()
def translate(
    checkpoints: Checkpoints,
    input: Annotated[str, typer.Option(help="Input file, or - for stdin")] = "-",
    output: Annotated[str, typer.Option(help="Output file, or - for stdout")] = "-",
    beam_size: Annotated[int | None, typer.Option(help="Beam width (1 = greedy)")] = None,
    length_penalty: Annotated[float | None, typer.Option(help="GNMT alpha")] = None,
    coverage_penalty: Annotated[float | None, typer.Option(help="GNMT beta")] = None,
    n_best: Annotated[int | None, typer.Option(help="Write N hypotheses per line as TSV")] = None,
    max_tokens_per_batch: Annotated[
        int | None, typer.Option(help="Source tokens per batch")] = None,
    max_rows_per_batch: MaxRows = None,
    workers: Workers = None,
    max_source_tokens: MaxSourceTokens = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic quantisation (CPU)")] = None,
    attention_plot: Annotated[Path | None, typer.Option(help="Write attention PNGs here")] = None,
) -> None:
    """Translate lines (stdin to stdout by default): one output line per input line.

    Each line is answered as soon as the input pauses (what has arrived is translated in one
    batch and flushed); a file or a fast pipe fills batches of up to 1,000 lines. With --n-best N
    each input gives N lines of TSV: input index (0-based), rank, score, text. Several
    checkpoints decode as an ensemble (their log-probabilities averaged at every step).
    """
    from seq2seq import inference

    def action() -> None:
        _setup_warnings()
        loaded = inference.load_models(checkpoints, device, quantize)
        inference.require_task(loaded, "translation", checkpoints[0])
        config = _decode_options(loaded, beam_size=beam_size, length_penalty=length_penalty,
                                 coverage_penalty=coverage_penalty, n_best=n_best,
                                 max_tokens_per_batch=max_tokens_per_batch,
                                 max_rows_per_batch=max_rows_per_batch, workers=workers,
                                 max_source_tokens=max_source_tokens)
        source = sys.stdin.buffer if input == "-" else _open_input(input)
        batches = inference.read_batches(source, "<stdin>" if input == "-" else input)
        sink = (contextlib.nullcontext(sys.stdout) if output == "-"
                else inference.atomic_output(output))
        with sink as stream:
            inference.write_translations(loaded, batches, config, stream,
                                         n_best=n_best is not None, attention_dir=attention_plot)

    _run(action)


def _open_input(path: str) -> Any:
    from seq2seq.inference import InferenceError

    try:
        return open(path, "rb")  # noqa: SIM115 - closed when the process ends
    except OSError as error:
        raise InferenceError(f"{path}: cannot read ({error.strerror})") from None


@app.command()
def evaluate(
    checkpoints: Annotated[list[Path] | None, typer.Argument(
        help="Checkpoint(s); several form an ensemble (omit with --hypotheses)")] = None,
    source: Annotated[Path | None, typer.Option(help="Source sentences to translate")] = None,
    reference: Annotated[Path, typer.Option(help="Reference translations")] = ...,  # type: ignore[assignment]
    hypotheses: Annotated[Path | None, typer.Option(help="Score this output instead")] = None,
    beam_size: Annotated[int | None, typer.Option(help="Beam width")] = None,
    length_penalty: Annotated[float | None, typer.Option(help="GNMT alpha")] = None,
    coverage_penalty: Annotated[float | None, typer.Option(help="GNMT beta")] = None,
    max_tokens_per_batch: Annotated[
        int | None, typer.Option(help="Source tokens per batch")] = None,
    max_rows_per_batch: MaxRows = None,
    workers: Workers = None,
    max_source_tokens: MaxSourceTokens = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic quantisation (CPU)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Score translations with sacreBLEU: BLEU, chrF and TER, with their signatures."""
    from seq2seq import inference
    from seq2seq.evaluate import evaluate_files

    def action() -> dict[str, Any]:
        _setup_warnings()
        one_input = (not checkpoints) != (hypotheses is None)
        if not one_input or (checkpoints and source is None):
            raise inference.InferenceError("give either CHECKPOINT with --source, or --hypotheses")
        options = dict(beam_size=beam_size, length_penalty=length_penalty,
                       coverage_penalty=coverage_penalty, max_tokens_per_batch=max_tokens_per_batch,
                       max_rows_per_batch=max_rows_per_batch, workers=workers,
                       max_source_tokens=max_source_tokens)
        return evaluate_files(checkpoints or None, source, reference, hypotheses, device,
                              quantize, options)

    scores = _run(action)
    if as_json:
        typer.echo(json.dumps(scores))
        return
    for name in ("bleu", "chrf", "ter"):
        typer.echo(f"{name.upper():5s} {scores[name]:6.2f}  {scores['signatures'][name]}")


@app.command()
def generate(
    checkpoint: Checkpoint,
    prompt: Annotated[str, typer.Option(help="Text to continue")] = "",
    max_new_tokens: Annotated[int | None, typer.Option(help="Characters to generate")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k best (0 = off)")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus mass (1 = off)")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples")] = 1,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    beam_size: Annotated[int | None, typer.Option(help="Beam search instead of sampling")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    input: Annotated[str | None, typer.Option(
        help="Prompts, one per line (- for stdin): one JSON line out per prompt")] = None,
) -> None:
    """Generate text with a character LM, streaming a single sample as it is produced.

    With --input, every line is a prompt, answered as soon as it arrives with one JSON line
    {"prompt": ..., "samples": [...]}.
    """
    from seq2seq import inference

    def action() -> None:
        loaded = inference.load_model(checkpoint, device)
        inference.require_task(loaded, "lm", checkpoint)
        config = _decode_options(loaded, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, beam_size=beam_size,
                                 n_best=1 if beam_size else None)
        if num_samples < 1:
            raise inference.InferenceError(f"--num-samples must be at least 1, got {num_samples}")
        if input is not None:
            source = sys.stdin.buffer if input == "-" else _open_input(input)
            for batch in inference.read_batches(source, "<stdin>" if input == "-" else input):
                for line in batch:
                    samples = inference.generate(loaded, line, config, num_samples, seed)
                    sys.stdout.write(json.dumps({"prompt": line, "samples": samples},
                                                ensure_ascii=False) + "\n")
                sys.stdout.flush()
            return
        streaming = num_samples == 1 and config.beam_size == 1

        def show(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        if streaming:
            show(prompt)
        samples = inference.generate(loaded, prompt, config, num_samples, seed,
                                     on_text=show if streaming else None)
        if streaming:
            show("\n")
            return
        for i, sample in enumerate(samples):
            typer.echo(f"--- sample {i + 1} ---\n{sample}")

    _run(action)


@app.command()
def serve(
    checkpoints: Checkpoints,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for every interface)")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic quantisation (CPU)")] = None,
    max_sentences: Annotated[int, typer.Option(help="Sentences per request (more: 413)")] = 64,
    max_chars: Annotated[int, typer.Option(help="Characters per sentence (more: 413)")] = 2000,
    max_beam: Annotated[int, typer.Option(help="Largest beam a request may ask for")] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="Gather requests into one batch until they pause this long "
                                 "(at most 10 times as long in all)")] = 5.0,
    batch_tokens: Annotated[int, typer.Option(
        help="Source tokens that end the gathering early (0 = the recipe's batch budget)")] = 0,
) -> None:
    """Serve translation (or generation) over HTTP: POST /translate, POST /generate, GET /health,
    GET /info, OpenAPI docs at /docs, and a page at /. Needs the serve extra."""
    try:
        from seq2seq import serve as server
    except ImportError as error:
        _fail(error)
    _setup_logging()

    def action() -> None:
        limits = server.Limits(max_sentences=max_sentences, max_chars=max_chars,
                               max_beam=max_beam, batch_wait_ms=batch_wait_ms,
                               batch_tokens=batch_tokens)
        for name, value in dataclasses.asdict(limits).items():
            if value < 0 or (value == 0 and name not in ("batch_wait_ms", "batch_tokens")):
                raise server.InferenceError(f"--{name.replace('_', '-')} must be positive, "
                                            f"got {value}")
        server.serve(checkpoints, host, port, device, quantize, limits)

    _run(action)


@app.command("average-checkpoints")
def average_checkpoints(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints of one run")],
    output: Annotated[Path, typer.Option(help="Where to write the average")],
) -> None:
    """Average the weights of several checkpoints (e.g. the last few of a run)."""
    from seq2seq import checkpoint as ckpt

    _run(lambda: ckpt.save_checkpoint(output, ckpt.average_checkpoints(checkpoints)))
    typer.echo(f"{output}: average of {len(checkpoints)} checkpoints")


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory")],
         output: Annotated[Path | None, typer.Option(help="PNG path")] = None) -> None:
    """Draw training and validation curves from RUN_DIR/metrics.jsonl to a PNG."""
    from seq2seq.plot import plot_metrics

    path = _run(lambda: plot_metrics(run_dir, output or run_dir / "curves.png"))
    typer.echo(str(path))


def main() -> None:
    # The objects the imports made (torch's are most of them) live until exit: frozen, no
    # collection scans them again, including the one at shutdown (about 0.3 s with torch).
    gc.freeze()
    retain_freed_memory()  # freed tensors are reused, not unmapped and faulted in again
    app()
