"""Translation and generation over HTTP: ``seq2seq serve CKPT [CKPT ...]``.

A FastAPI app on uvicorn (the ``serve`` extra; this is the only module that imports them):
``POST /translate`` and ``POST /generate``, ``GET /health`` and ``GET /info``, the framework's
OpenAPI schema at ``/openapi.json`` and docs at ``/docs``, and a small page at ``/``.

Requests that arrive together are decoded together: handlers tokenise and check their input on
the event loop, then hand it to a :class:`Batcher`, one thread that owns the model. It takes the
first waiting job, gathers what else arrives until requests pause for a few milliseconds (or a
source-token budget is full), and runs one :func:`~seq2seq.inference.translate_ids` per set of
decode options, the batched search the command line uses. A bad request gets a 4xx JSON
``{"error": ...}`` naming the problem and never reaches the model; SIGTERM finishes the requests
in flight, then exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seq2seq.config import DecodeConfig
from seq2seq.heap import release_free_memory
from seq2seq.inference import (
    InferenceError,
    LoadedModel,
    check_decode_options,
    encode_source,
    generate,
    generation_config,
    load_models,
    translate_ids,
)
from seq2seq.search import Hypothesis

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as missing:
    raise ImportError(f"seq2seq serve needs {missing.name}: pip install 'seq2seq[serve]'") \
        from missing

log = logging.getLogger(__name__)

TRIM_EVERY = 64  # batches between returning freed heap pages to the system (see inference)
GATHER_CAP = 10  # a batch gathers for at most this many waits


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these a request is refused (413 or 422)."""

    max_sentences: int = 64  # sentences per /translate request (413)
    max_chars: int = 2000  # characters per sentence or prompt (413)
    max_beam: int = 16  # beam_size (422)
    max_new_tokens: int = 2000  # /generate (422)
    max_samples: int = 8  # /generate num_samples (422)
    batch_wait_ms: float = 5.0  # the batcher gathers until requests pause this long (x10 at most)
    batch_tokens: int = 0  # source-token budget of one gathered batch (0 = the recipe's)


class TranslateRequest(BaseModel):
    """Sentences to translate; options left out take the recipe's decode settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: list[str] = Field(min_length=1, description="sentences, one translation each")
    beam_size: int | None = Field(None, ge=1, description="beam width (1 = greedy)")
    n_best: int | None = Field(None, ge=1, description="hypotheses per sentence (<= beam_size)")
    length_penalty: float | None = Field(None, ge=0, le=10, description="GNMT alpha")
    coverage_penalty: float | None = Field(None, ge=0, le=10, description="GNMT beta")
    min_length: int | None = Field(None, ge=0, le=1000)
    max_length_ratio: float | None = Field(None, gt=0, le=10)
    max_length_offset: int | None = Field(None, ge=0, le=1000)
    no_repeat_ngram: int | None = Field(None, ge=0, le=10)
    ban_unk: bool | None = None


class GenerateRequest(BaseModel):
    """A prompt for the character LM; options left out take the recipe's decode settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field("", description="text to continue")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    beam_size: int | None = Field(None, ge=1)
    num_samples: int = Field(1, ge=1)
    seed: int = 0


@dataclass
class _Job:
    """Work for the decoding thread: source ids under one config, or a call of its own."""

    future: concurrent.futures.Future
    ids: list[list[int]] = dataclasses.field(default_factory=list)
    config: DecodeConfig | None = None
    call: Callable[[], Any] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.ids)


class Batcher:
    """One thread that owns the model and decodes gathered requests (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, wait_s: float, token_budget: int):
        self.loaded, self.wait_s, self.token_budget = loaded, wait_s, token_budget
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._batches = 0
        self.searches = self.sentences = 0  # batched searches run, and the sentences in them
        self._thread = threading.Thread(target=self._loop, name="seq2seq-decoder", daemon=True)
        self._thread.start()

    def translate(self, ids: list[list[int]], config: DecodeConfig) -> concurrent.futures.Future:
        """Hypotheses per source (ids end with EOS; an empty list gives no hypothesis)."""
        job = _Job(concurrent.futures.Future(), ids=ids, config=config)
        self._queue.put(job)
        return job.future

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``function`` on the decoding thread, between batches."""
        job = _Job(concurrent.futures.Future(), call=function)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        running = True
        while running:
            first = self._queue.get()
            if first is None:
                return
            jobs, running = self._gather(first)
            self._run(jobs)
            self._batches += 1
            if self._batches % TRIM_EVERY == 0 or self._queue.empty():
                release_free_memory()

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job and those that follow it closely: gathering ends when no job comes for
        the wait, when the token budget is full, or after ``GATHER_CAP`` waits in all (so a
        steady stream of requests still gets answered). Under load the clients of the last
        batch send their next requests within a few milliseconds of each other, and waiting
        for the lull puts them in one search instead of several small ones."""
        jobs, tokens = [first], first.tokens
        deadline = time.monotonic() + GATHER_CAP * self.wait_s
        while tokens < self.token_budget:
            timeout = min(self.wait_s, deadline - time.monotonic())
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, False
            jobs.append(job)
            tokens += job.tokens
        return jobs, True

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        groups: dict[DecodeConfig, list[_Job]] = {}
        for job in jobs:
            if job.call is not None:
                _settle([job], job.call)
            else:
                groups.setdefault(job.config, []).append(job)
        for config, group in groups.items():
            _settle(group, lambda c=config, g=group: self._translate(g, c))

    def _translate(self, jobs: list[_Job], config: DecodeConfig) -> list[list[list[Hypothesis]]]:
        """One batched search over the jobs' non-empty sources; results split back per job."""
        sources = [ids for job in jobs for ids in job.ids if ids]
        self.searches, self.sentences = self.searches + 1, self.sentences + len(sources)
        decoded = iter(translate_ids(self.loaded.model, sources, config, self.loaded.device))
        return [[next(decoded) if ids else [] for ids in job.ids] for job in jobs]


def _settle(jobs: list[_Job], compute: Callable[[], Any]) -> None:
    """Give each job its part of ``compute()`` (a list per job, or one value for one job), or
    the exception it raised."""
    try:
        result = compute()
    except Exception as error:  # a bug: every waiting request gets a 500, the thread lives on
        log.exception("decoding failed")
        for job in jobs:
            job.future.set_exception(error)
        return
    parts = result if jobs[0].call is None else [result]
    for job, part in zip(jobs, parts, strict=True):
        job.future.set_result(part)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _BodyLimit:
    """ASGI middleware: a request whose Content-Length is over ``max_body`` gets a 413 before its
    body is read. Plain ASGI, because Starlette's ``BaseHTTPMiddleware`` costs every request a
    task group and a body stream: about a third of the server's time per request under load."""

    def __init__(self, app: Any, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body:
                await _error(413, f"request body of {int(length)} bytes is over the limit of "
                                  f"{self.max_body}")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    """400 for a body that is not JSON, else 422, with each problem's field and reason."""
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return 400, "the request body is not valid JSON"
    parts = []
    for problem in problems:
        where = ".".join(str(x) for x in problem.get("loc", ())[1:]) or "body"
        if problem.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown option")
        else:
            parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def _hypothesis(tokenizer: Any, hyp: Hypothesis) -> dict[str, Any]:
    return {"text": tokenizer.decode(hyp.tokens), "score": round(hyp.score, 6),
            "log_prob": round(hyp.log_prob, 6)}


def model_info(loaded: LoadedModel, paths: list[str], quantize: str | None,
               limits: Limits) -> dict[str, Any]:
    """What ``GET /info`` reports: the model, its recipe in brief, tokenizer, device, limits."""
    recipe = loaded.recipe
    return {
        "checkpoints": paths, "ensemble": len(paths) > 1, "task": recipe.data.task,
        "step": loaded.step, "device": str(loaded.device), "quantize": quantize or "none",
        "threads": torch.get_num_threads(),
        "recipe": {"source_lang": recipe.data.source_lang,
                   "target_lang": recipe.data.target_lang,
                   "model": dataclasses.asdict(recipe.model)},
        "tokenizer": {"kind": loaded.tokenizer.kind, "vocab_size": loaded.tokenizer.vocab_size},
        "decode": dataclasses.asdict(recipe.decode), "limits": dataclasses.asdict(limits),
    }


def create_app(loaded: LoadedModel, paths: list[str] | None = None,
               limits: Limits | None = None, quantize: str | None = None) -> FastAPI:
    """The HTTP app over a loaded model (one checkpoint or an ensemble)."""
    limits = limits or Limits()
    paths = paths or ["(in memory)"]
    task = loaded.recipe.data.task
    budget = limits.batch_tokens or loaded.recipe.decode.max_tokens_per_batch
    batcher = Batcher(loaded, limits.batch_wait_ms / 1000, budget)
    info = model_info(loaded, paths, quantize, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - the framework's protocol
        yield
        batcher.close()

    app = FastAPI(title="seq2seq", version="0.1.0", lifespan=lifespan,
                  description="GNMT-style LSTM translation and character-level LMs.")
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, max_body=limits.max_sentences * (4 * limits.max_chars + 16)
                       + 4096)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(error))

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def bug(_: Request, error: Exception) -> JSONResponse:  # logged by the batcher
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the server answers."""
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        """Counters since the start: batched searches and the sentences they decoded (their ratio
        is how well concurrent requests are being batched together)."""
        return {"searches": batcher.searches, "sentences": batcher.sentences}

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        """The model, a summary of its recipe, the tokenizer, the device and the limits."""
        return info

    @app.post("/translate")
    async def translate(request: TranslateRequest) -> dict[str, Any]:
        """Translate sentences: per sentence the best text and score, and the n best."""
        if task != "translation":
            raise RequestError(400, "this server holds a character LM; POST /generate instead")
        config = _translate_config(loaded, request, limits)
        ids = _encode(loaded, request.text, limits)
        results = await asyncio.wrap_future(batcher.translate(ids, config))
        tokenizer = loaded.tokenizer
        return {"translations": [
            {"text": tokenizer.decode(hyps[0].tokens) if hyps else "",
             "score": round(hyps[0].score, 6) if hyps else 0.0,
             "n_best": [_hypothesis(tokenizer, h) for h in hyps[:config.n_best]]}
            for hyps in results]}

    @app.post("/generate")
    async def generate_text(request: GenerateRequest) -> dict[str, Any]:
        """Continue a prompt with the character LM: the samples, prompt included."""
        if task != "lm":
            raise RequestError(400, "this server holds a translation model; POST /translate "
                                    "instead")
        config = _generate_config(loaded, request, limits)
        samples = await asyncio.wrap_future(batcher.call(
            lambda: generate(loaded, request.prompt, config, request.num_samples, request.seed)))
        return {"samples": samples}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.replace("{{task}}", task)

    return app


def _translate_config(loaded: LoadedModel, request: TranslateRequest,
                      limits: Limits) -> DecodeConfig:
    if len(request.text) > limits.max_sentences:
        raise RequestError(413, f"text: {len(request.text)} sentences, the limit is "
                                f"{limits.max_sentences} per request")
    options = request.model_dump(exclude={"text"}, exclude_none=True)
    if options.get("beam_size", 0) > limits.max_beam:
        raise RequestError(422, f"beam_size: {options['beam_size']} is over this server's "
                                f"limit of {limits.max_beam}")
    return _checked(generation_config(loaded.recipe.decode, **options))


def _generate_config(loaded: LoadedModel, request: GenerateRequest,
                     limits: Limits) -> DecodeConfig:
    if len(request.prompt) > limits.max_chars:
        raise RequestError(413, f"prompt: {len(request.prompt)} characters, the limit is "
                                f"{limits.max_chars}")
    for name, value, limit in (("max_new_tokens", request.max_new_tokens, limits.max_new_tokens),
                               ("beam_size", request.beam_size, limits.max_beam),
                               ("num_samples", request.num_samples, limits.max_samples)):
        if value is not None and value > limit:
            raise RequestError(422, f"{name}: {value} is over this server's limit of {limit}")
    options = request.model_dump(exclude={"prompt", "num_samples", "seed"}, exclude_none=True)
    if options.get("beam_size", 1) > 1:
        options["n_best"] = 1
    return _checked(generation_config(loaded.recipe.decode, **options))


def _checked(config: DecodeConfig) -> DecodeConfig:
    try:
        check_decode_options(config)
    except InferenceError as error:
        raise RequestError(422, str(error)) from None
    return config


def _encode(loaded: LoadedModel, texts: list[str], limits: Limits) -> list[list[int]]:
    """Source ids (x + EOS; [] for a blank sentence); an over-long sentence is refused whole."""
    ids = []
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise RequestError(413, f"text[{i}]: {len(text)} characters, the limit is "
                                    f"{limits.max_chars}")
        ids.append(encode_source(loaded.tokenizer, text) if text.strip() else [])
    return ids


def _exit_quietly(signum: int, frame: Any) -> None:
    """uvicorn re-raises the SIGTERM it shut down gracefully for; by then the work is done."""


def serve(paths: list[Path], host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          quantize: str | None = None, limits: Limits | None = None) -> None:
    """Load the checkpoints (several: an ensemble) and serve them until SIGTERM or Ctrl-C."""
    loaded = load_models(paths, device, quantize)
    app = create_app(loaded, [str(p) for p in paths], limits, quantize)
    signal.signal(signal.SIGTERM, _exit_quietly)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>seq2seq</title>
<style>body{font-family:sans-serif;max-width:46em;margin:2em auto}
textarea{width:100%;height:8em}pre{white-space:pre-wrap;background:#f4f4f4;padding:1em}</style>
</head><body>
<h1>seq2seq</h1>
<p id="hint"></p>
<textarea id="source" placeholder="One sentence per line"></textarea>
<p><button id="go">Translate</button></p>
<pre id="result"></pre>
<script>
const task = "{{task}}";
const source = document.getElementById("source"), result = document.getElementById("result");
const button = document.getElementById("go");
if (task === "lm") { button.textContent = "Generate"; source.placeholder = "A prompt"; }
document.getElementById("hint").textContent = task === "lm"
  ? "Type a prompt for the character model." : "Type sentences to translate, one per line.";
button.addEventListener("click", async () => {
  result.textContent = "...";
  const lm = task === "lm";
  const body = lm ? {prompt: source.value}
                  : {text: source.value.split("\\n").filter(s => s.trim() !== "")};
  try {
    const response = await fetch(lm ? "/generate" : "/translate", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const answer = await response.json();
    result.textContent = !response.ok ? "error: " + answer.error
      : lm ? answer.samples.join("\\n---\\n") : answer.translations.map(t => t.text).join("\\n");
  } catch (error) { result.textContent = "error: " + error; }
});
</script></body></html>
"""
