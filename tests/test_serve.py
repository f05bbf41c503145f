"""``seq2seq serve``: the HTTP API in process, bad requests, SIGTERM, the page in a browser."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from seq2seq.cli import app as cli_app  # noqa: E402
from seq2seq.inference import generate, load_model, load_models, translate_lines  # noqa: E402
from seq2seq.serve import Batcher, Limits, create_app  # noqa: E402

from .test_cli import assert_user_error, toy_valid  # noqa: E402

LIMITS = Limits(max_sentences=4, max_chars=40, max_beam=6, batch_wait_ms=1.0)


@pytest.fixture(scope="module")
def toy_loaded(toy_run):
    return load_model(toy_run / "best.pt")


@pytest.fixture(scope="module")
def client(toy_loaded):
    with TestClient(create_app(toy_loaded, ["toy.pt"], LIMITS)) as client:
        yield client


@pytest.fixture(scope="module")
def sources(toy_run) -> list[str]:
    return [s for s, _ in toy_valid(toy_run)]


def test_translate_matches_the_command_line_decoder(client, toy_loaded, sources):
    config = replace(toy_loaded.recipe.decode, beam_size=4, n_best=2)
    expected = translate_lines(toy_loaded, sources[:3] + [""], config)
    response = client.post("/translate", json={"text": sources[:3] + [""], "beam_size": 4,
                                               "n_best": 2})
    assert response.status_code == 200, response.text
    got = response.json()["translations"]
    for item, hyps in zip(got, expected, strict=True):
        assert item["n_best"] == [{"text": toy_loaded.tokenizer.decode(h.tokens),
                                   "score": round(h.score, 6), "log_prob": round(h.log_prob, 6)}
                                  for h in hyps]
        assert item["text"] == (item["n_best"][0]["text"] if hyps else "")
    assert got[-1] == {"text": "", "score": 0.0, "n_best": []}


def test_concurrent_requests_are_decoded_together_and_answered_apart(toy_loaded, sources):
    batcher = Batcher(toy_loaded, wait_s=2.0, token_budget=10**6)
    config = toy_loaded.recipe.decode
    ids = [toy_loaded.tokenizer.encode(s) + [3] for s in sources[:12]]
    futures = [batcher.translate(ids[i:i + 3], config) for i in range(0, 12, 3)]
    results = [hyp for future in futures for hyp in future.result(timeout=60)]
    batcher.close()
    assert (batcher.searches, batcher.sentences) == (1, 12)  # within the 2 s window: one search
    expected = translate_lines(toy_loaded, sources[:12], config)
    assert [h[0].tokens for h in results] == [h[0].tokens for h in expected]


def test_health_info_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["task"] == "translation" and info["device"] == "cpu"
    assert info["tokenizer"]["kind"] == "char" and info["limits"]["max_sentences"] == 4
    assert info["recipe"]["model"]["hidden_size"] > 0
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/translate", "/generate", "/health", "/info", "/stats"} <= set(paths)
    assert "<textarea" in client.get("/").text


def test_stats_count_searches_and_sentences(client, sources):
    before = client.get("/stats").json()
    assert client.post("/translate", json={"text": sources[:3]}).status_code == 200
    after = client.get("/stats").json()
    assert after == {"searches": before["searches"] + 1, "sentences": before["sentences"] + 3}


BAD_REQUESTS = [
    ("malformed JSON", b'{"text": ["a b"', 400, "not valid JSON"),
    ("text not a list", {"text": "a b"}, 422, "text"),
    ("a sentence not a string", {"text": ["a", 5]}, 422, "text.1"),
    ("beam as a string", {"text": ["a"], "beam_size": "5"}, 422, "beam_size"),
    ("empty list", {"text": []}, 422, "text"),
    ("no text", {"beam_size": 2}, 422, "text"),
    ("over-long text", {"text": ["a " * 30]}, 413, "text[0]: 60 characters"),
    ("too many sentences", {"text": ["a"] * 5}, 413, "5 sentences"),
    ("unknown option", {"text": ["a"], "beam": 3}, 422, "beam: unknown option"),
    ("beam 0", {"text": ["a"], "beam_size": 0}, 422, "beam_size"),
    ("beam over the limit", {"text": ["a"], "beam_size": 7}, 422, "limit of 6"),
    ("n-best over the beam", {"text": ["a"], "beam_size": 2, "n_best": 3}, 422, "n-best"),
    ("a JSON list", [1, 2], 422, "body"),
]


@pytest.mark.parametrize("name, body, status, fragment", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_json_error_and_the_server_carries_on(client, sources, name, body,
                                                                 status, fragment):
    if isinstance(body, bytes):
        response = client.post("/translate", content=body,
                               headers={"content-type": "application/json"})
    else:
        response = client.post("/translate", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"], response.json()
    good = client.post("/translate", json={"text": sources[:1]})
    assert good.status_code == 200 and good.json()["translations"][0]["text"]


def test_a_huge_body_is_refused_before_it_is_parsed(client):
    response = client.post("/translate", content=b"x" * 10**6,
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]


def test_generate_to_a_translation_model_and_translate_to_an_lm(client, lm_run):
    response = client.post("/generate", json={"prompt": "a"})
    assert response.status_code == 400 and "translation model" in response.json()["error"]
    lm = load_model(lm_run / "best.pt")
    with TestClient(create_app(lm, ["lm.pt"], LIMITS)) as lm_client:
        response = lm_client.post("/translate", json={"text": ["a"]})
        assert response.status_code == 400 and "POST /generate" in response.json()["error"]
        response = lm_client.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 12,
                                                     "seed": 5, "temperature": 0.7})
        assert response.status_code == 200, response.text
        config = replace(lm.recipe.decode, max_new_tokens=12, temperature=0.7)
        assert response.json()["samples"] == generate(lm, "ROMEO:", config, 1, 5)
        bad = lm_client.post("/generate", json={"prompt": "x", "top_p": 0})
        assert bad.status_code == 422 and "top_p" in bad.json()["error"]


def test_an_ensemble_server_translates_as_its_model(toy_run, client, sources):
    pair = load_models([toy_run / "best.pt", toy_run / "best.pt"])
    with TestClient(create_app(pair, ["a.pt", "b.pt"], LIMITS)) as ensemble:
        body = {"text": sources[:4], "beam_size": 3}
        assert ensemble.post("/translate", json=body).json() == \
            client.post("/translate", json=body).json()
        assert ensemble.get("/info").json()["ensemble"] is True


def test_serve_without_the_extra_names_it(toy_run, monkeypatch):
    import seq2seq

    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "seq2seq.serve", raising=False)
    monkeypatch.delattr(seq2seq, "serve", raising=False)
    result = CliRunner().invoke(cli_app, ["serve", str(toy_run / "best.pt")])
    assert_user_error(result, "seq2seq[serve]")


def test_serve_user_errors(toy_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", str(toy_run / "best.pt"), "--max-sentences", "0"])
    assert_user_error(result, "--max-sentences must be positive")
    result = runner.invoke(cli_app, ["serve", str(tmp_path / "missing.pt")])
    assert_user_error(result, "missing.pt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``seq2seq serve`` in a subprocess, once it answers /health."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "serve", str(checkpoint),
                                "--port", str(port), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise AssertionError(process.stdout.read().decode())
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not start")


def test_sigterm_finishes_the_request_in_flight_then_exits_0(toy_run, sources):
    # a 3 s gathering window holds the request in flight while SIGTERM arrives
    process, url = start_server(toy_run / "best.pt", "--batch-wait-ms", "3000")
    answers: list[httpx.Response] = []
    try:
        request = threading.Thread(target=lambda: answers.append(
            httpx.post(url + "/translate", json={"text": sources[:2]}, timeout=60)))
        request.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        assert process.wait(timeout=60) == 0, process.stdout.read().decode()
    finally:
        process.kill()
    assert answers and answers[0].status_code == 200, answers
    assert len(answers[0].json()["translations"]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4, messages
    ended by NUL), so no websocket library is needed."""

    def __init__(self, profile: str):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child: high copies first, so neither clobbers
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            close_fds=False, preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._next, self._buffer = 0, b""

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                assert "error" not in reply, reply
                return reply["result"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_page_translates_in_a_headless_browser(toy_run, sources):
    process, url = start_server(toy_run / "best.pt")
    profile = tempfile.mkdtemp()
    browser = DevTools(profile)
    try:
        target = browser.send("Target.createTarget", url=url + "/")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

        def evaluate(expression: str):
            result = browser.send("Runtime.evaluate", session, expression=expression,
                                  awaitPromise=True, returnByValue=True)
            return result["result"].get("value")

        for _ in range(300):
            if evaluate("document.readyState === 'complete' && !!document.getElementById('go')"):
                break
            time.sleep(0.1)
        evaluate(f"document.getElementById('source').value = {json.dumps(sources[0])};"
                 "document.getElementById('go').click(); true")
        text = ""
        for _ in range(300):
            text = evaluate("document.getElementById('result').textContent")
            if text and text != "...":
                break
            time.sleep(0.1)
        expected = httpx.post(url + "/translate", json={"text": sources[:1]}).json()
        assert text == expected["translations"][0]["text"]
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
