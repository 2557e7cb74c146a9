"""The fake LLM provider as a real process on loopback, driven over HTTP and by the openai package."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ctops_tools.procs import ctops_argv
from ctops_tools.redis_embed import free_port
from tests.common import wait_http
from trainer.fake_llm import CONTROL_TOKEN_ENV, control_headers, control_token

ROOT = Path(__file__).resolve().parent.parent


def start_fake(*extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*ctops_argv(), "fake-llm", "--port", str(port), "--name", "fake-a", *extra], cwd=ROOT,
                            env=env)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/_fake/mode", proc)
    return proc, base


def stop_fake(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, "fake-llm should exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    proc, base = start_fake(env={**os.environ, CONTROL_TOKEN_ENV: control_token()})
    try:
        yield base
    finally:
        stop_fake(proc)


def set_mode(base: str, mode: str, delay_ms: int | None = None) -> None:
    body: dict = {"mode": mode} if delay_ms is None else {"mode": mode, "delay_ms": delay_ms}
    r = httpx.post(base + "/_fake/mode", json=body, headers=control_headers())
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == mode


@pytest.fixture
def base(fake: str) -> Iterator[str]:
    set_mode(fake, "ok")
    yield fake
    set_mode(fake, "ok")


PROMPT = "Exercise: fizzbuzz (FizzBuzz)\nVerdict: failed (2 of 5 tests passed) - 2 of 5 tests passed\n"


def chat(base: str, timeout: float = 10.0, **extra: object) -> httpx.Response:
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": PROMPT}], **extra}
    return httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"},
                      timeout=timeout)


def test_ok_answers_in_openai_shape_naming_the_fake_and_the_results(base: str) -> None:
    r = chat(base)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    text = body["choices"][0]["message"]["content"]
    assert "fake-a" in text and "fizzbuzz" in text and "2 of 5 tests passed" in text


def test_models_lists_one_model(base: str) -> None:
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list" and r.json()["data"]


def test_mode_500_gives_an_openai_style_error(base: str) -> None:
    set_mode(base, "500")
    assert httpx.get(base + "/_fake/mode").json()["mode"] == "500"
    r = chat(base)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"


def test_mode_429_gives_retry_after(base: str) -> None:
    set_mode(base, "429")
    r = chat(base)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_mode_hang_never_answers(base: str) -> None:
    set_mode(base, "hang")
    with pytest.raises(httpx.ReadTimeout):
        chat(base, timeout=0.5)
    # the fake keeps serving its control endpoints while a request hangs
    assert httpx.get(base + "/_fake/stats").status_code == 200


def test_mode_slow_answers_after_the_delay(base: str) -> None:
    set_mode(base, "slow", delay_ms=200)
    assert httpx.get(base + "/_fake/mode").json()["delay_ms"] == 200
    r = chat(base)
    assert r.status_code == 200 and "fake-a" in r.json()["choices"][0]["message"]["content"]


def test_bad_mode_is_rejected(base: str) -> None:
    r = httpx.post(base + "/_fake/mode", json={"mode": "explode"}, headers=control_headers())
    assert r.status_code == 422
    assert httpx.get(base + "/_fake/mode").json()["mode"] == "ok"


def test_stats_count_requests(base: str) -> None:
    before = httpx.get(base + "/_fake/stats").json()["requests"]
    chat(base)
    set_mode(base, "500")
    chat(base)
    after = httpx.get(base + "/_fake/stats").json()["requests"]
    assert after["total"] == before.get("total", 0) + 2
    assert after["status_500"] == before.get("status_500", 0) + 1


def test_streaming_with_the_openai_package(base: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": PROMPT}],
                                            stream=True)
    pieces = []
    finish = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(pieces)
    assert "fake-a" in text and "fizzbuzz" in text
    assert finish == "stop"
    # and the non-streaming call through the same package
    done = client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": PROMPT}])
    assert done.choices[0].message.content == text


def test_openai_package_sees_the_500_as_an_api_error(base: str) -> None:
    set_mode(base, "500")
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=10)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])




def test_switching_the_mode_needs_the_control_token(base: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": control_token()},
                    {"Authorization": f"Basic {control_token()}"}):
        for body in ({"mode": "hang"}, {"mode": "explode"}, None):
            r = httpx.post(base + "/_fake/mode", json=body, headers=headers)
            assert r.status_code == 401, (headers, body, r.text)
            assert r.json()["error"] == "control token required"
    # nothing changed; reading stays open
    assert httpx.get(base + "/_fake/mode").json()["mode"] == "ok"
    assert chat(base).status_code == 200
    assert httpx.get(base + "/_fake/stats").status_code == 200


def test_a_fake_started_without_a_token_refuses_every_switch() -> None:
    env = {k: v for k, v in os.environ.items() if k not in (CONTROL_TOKEN_ENV, "CTOPS_TEST_FAKE_TOKEN")}
    proc, base = start_fake(env=env)
    try:
        r = httpx.post(base + "/_fake/mode", json={"mode": "500"}, headers=control_headers())
        assert r.status_code == 401
        assert httpx.get(base + "/_fake/mode").json()["mode"] == "ok"
    finally:
        stop_fake(proc)
    # --control-token-env names another variable
    proc, base = start_fake("--control-token-env", "CTOPS_TEST_FAKE_TOKEN", env={**env, "CTOPS_TEST_FAKE_TOKEN": "t0k"})
    try:
        assert httpx.post(base + "/_fake/mode", json={"mode": "500"}, headers=control_headers()).status_code == 401
        r = httpx.post(base + "/_fake/mode", json={"mode": "500"}, headers={"Authorization": "Bearer t0k"})
        assert r.status_code == 200 and r.json()["mode"] == "500"
    finally:
        stop_fake(proc)
