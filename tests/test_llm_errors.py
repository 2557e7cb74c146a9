"""What a client of the LLM pool (and a learner waiting for a review) is told when no provider
answers: a generic message, an error code and a reference, never the providers' names, addresses or
failures. Those go to the dispatcher's log, under the same reference, for staff.

The providers are real: one `ctops fake-llm` answering 429 to everything, and an address nobody
listens on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import httpx
import pytest

from ctops import config
from ctops_tools.procs import Child, ctops_argv, spawn, stop_all
from ctops_tools.redis_embed import free_port
from dispatcher.llm import start_llm_pool
from tests.cluster import wait_for
from trainer import review

# names an attacker could use: which vendors, which accounts, where they are
PRIMARY, BACKUP = "acme-openai-eu", "globex-azure-backup"


@pytest.fixture(scope="module")
def busy_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("llm-errors") / "fake.log"
    child: Child = spawn(BACKUP, ctops_argv("fake-llm", "--port", str(port), "--name", BACKUP, "--mode", "429"),
                         str(log))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the fake to answer", lambda: httpx.get(url + "/_fake/mode", timeout=2).status_code == 200)
        yield url
    finally:
        stop_all([child])


def leaks(text: str, *addresses: str) -> list[str]:
    secrets = [PRIMARY, BACKUP, "acme", "globex", "fake", "127.0.0.1", "HTTP 429", "ConnectError", "Connect",
               *addresses]
    return [s for s in secrets if s.lower() in text.lower()]


async def test_pool_errors_name_no_provider_and_the_log_has_the_details(
        busy_fake: str, caplog: pytest.LogCaptureFixture) -> None:
    dead_port = str(free_port())
    dep = config.parse({
        "dispatchers": [{"name": "A", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
        "llm_providers": [{"name": PRIMARY, "base_url": f"http://127.0.0.1:{dead_port}/v1", "priority": 1,
                           "timeout_ms": 2000},
                          {"name": BACKUP, "base_url": f"{busy_fake}/v1", "priority": 2, "timeout_ms": 2000}],
        "llm": {"cooldown_ms": 60_000, "health_interval_ms": 60_000, "rate_limit_default_ms": 0},
    })
    caplog.set_level(logging.INFO)
    h = await start_llm_pool(dep, None, None, lambda *_: None, lambda: True)
    codes = set()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(5):  # failed tries first; once the breaker opens, no provider is even tried
                r = await client.post(f"{h.url}/llm/v1/chat/completions",
                                      json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code in (429, 502, 503, 504), r.text
                assert leaks(r.text + str(r.headers), busy_fake.rsplit(":", 1)[1], dead_port) == [], r.text
                err = r.json()["error"]
                codes.add(err["code"])
                ref = re.search(r"\(reference (llm-[0-9a-f]+)\)", err["message"])
                assert ref is not None, err
                # staff find what happened under the reference the client quotes
                logged = [rec.getMessage() for rec in caplog.records if ref.group(1) in rec.getMessage()]
                assert logged and (PRIMARY in logged[0] or BACKUP in logged[0]), logged
    finally:
        await h.stop()
    assert codes & {"providers_failed", "providers_unavailable", "rate_limit_exceeded"}, codes


def test_an_unavailable_review_names_no_provider_or_setting(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    shown = review.unavailable(f"no LLM provider is configured ({PRIMARY} disabled)")
    assert shown["status"] == "unavailable" and shown["provider"] is None
    assert leaks(shown["text"]) == [] and "provider" not in shown["text"].lower()
    assert PRIMARY in caplog.text  # the reason is for staff
