"""LLM reviews of a submission: where to ask, in which order, and what the learner sees instead.

The review is a bonus on top of the test results: when no endpoint answers within the budget the
caller completes the submission with the review pending (degraded mode) and a retry loop fills it
in later; a failure is never the learner's problem.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from ctops.config import Deployment, TrainerSettings
from ctops.rejects import LLM_ANSWER, REJECTS
from trainer.exercises import Exercise

log = logging.getLogger("trainer.review")

CODE_MAX_CHARS = 6000
REVIEW_MAX_CHARS = 4000
PENDING_MESSAGE = "Your tests ran. The AI review is delayed and will appear here shortly."
# a pool may say which provider answered; shown with the review
PROVIDER_HEADER = "x-ctops-llm-provider"

SYSTEM = ("You are a friendly programming tutor. Review the learner's Python code in at most 5 short "
          "sentences: say what is good, what is wrong and give one hint. Do not write the full solution.")


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    base_url: str  # OpenAI-style, ending before /chat/completions
    model: str
    api_key: str
    timeout_ms: int


def endpoints(deployment: Deployment) -> list[Endpoint]:
    """Where reviews come from, in the order to try them: the one place that decides it."""
    t = deployment.trainer
    if t.llm == "dispatcher":
        # every dispatcher serves the pool on its data port; the standby takes over the leader's
        model = t.llm_model or deployment.llm.models[0]
        key = deployment.llm.client_key or ""
        return [Endpoint(f"pool@{d.name}", f"{d.data_url}/llm/v1", model, key, t.llm_timeout_ms)
                for d in deployment.dispatchers]
    return [Endpoint(p.name, p.base_url.rstrip("/"), p.model, p.api_key, p.timeout_ms)
            for p in deployment.providers_by_priority()]


def prompt(exercise: Exercise, code: str, result: dict) -> str:
    tests = "\n".join(f"- {t['name']}: {'passed' if t['passed'] else 'FAILED ' + t['message']}"
                      for t in result["tests"]) or "- (no test ran)"
    passed = sum(1 for t in result["tests"] if t["passed"])
    return (
        f"Exercise: {exercise.id} ({exercise.title})\n"
        f"Statement: {exercise.statement}\n"
        f"Verdict: {result['verdict']} ({passed} of {len(exercise.tests)} tests passed) - {result['message']}\n"
        f"Tests:\n{tests}\n"
        f"Code:\n```python\n{code[:CODE_MAX_CHARS]}\n```\n"
    )


UNAVAILABLE_MESSAGE = "The automatic review is unavailable. Your test results are complete."


def unavailable(reason: str) -> dict:
    """What the learner sees when there is no review to wait for; `reason` (naming providers or
    settings) is logged, never shown."""
    log.info("review unavailable: %s", reason)
    return {"status": "unavailable", "provider": None, "text": UNAVAILABLE_MESSAGE}


def pending(attempts: int = 0) -> dict:
    return {"status": "pending", "provider": None, "text": "", "message": PENDING_MESSAGE, "attempts": attempts}


class Failed(Exception):
    def __init__(self, reason: str, retry_after_s: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class Reviewer:
    """Tries the endpoints in order within a total budget. An endpoint that failed is skipped by live
    reviews for a cooldown, so that during an outage submissions do not each wait for its timeout.
    The cooldown is this process's own hint, not shared state: losing it costs one slow try."""

    def __init__(self, client: httpx.AsyncClient, eps: list[Endpoint], settings: TrainerSettings) -> None:
        self.http = client
        self.endpoints = eps
        self.settings = settings
        self.down_until: dict[str, float] = {}

    @property
    def configured(self) -> bool:
        return bool(self.endpoints)

    async def review(self, exercise: Exercise, code: str, result: dict, probe: bool = False) -> dict | None:
        """A done review, or None when no endpoint answered. `probe` also tries cooling-down endpoints
        (the retry loop uses it to notice a provider is back)."""
        now = time.monotonic()
        order = [e for e in self.endpoints if probe or self.down_until.get(e.name, 0) <= now]
        body = {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": prompt(exercise, code, result)}],
                "max_tokens": 300, "temperature": 0.2}
        deadline = now + self.settings.review_budget_ms / 1000
        for ep in order:
            left = deadline - time.monotonic()
            if left <= 0.05:
                break
            try:
                text, provider = await self._ask(ep, body, min(left, ep.timeout_ms / 1000))
            except Failed as exc:
                cool = max(self.settings.provider_cooldown_ms / 1000, exc.retry_after_s)
                self.down_until[ep.name] = time.monotonic() + cool
                log.warning("review from %s failed: %s", ep.name, exc)
                continue
            self.down_until.pop(ep.name, None)
            return {"status": "done", "provider": provider, "text": text}
        return None

    async def _ask(self, ep: Endpoint, body: dict, timeout: float) -> tuple[str, str]:
        headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
        try:
            resp = await asyncio.wait_for(
                self.http.post(f"{ep.base_url}/chat/completions", json={**body, "model": ep.model},
                               headers=headers, timeout=timeout), timeout + 0.5)
        except (httpx.TimeoutException, TimeoutError):
            raise Failed(f"no answer within {timeout * 1000:.0f} ms") from None
        except httpx.HTTPError as exc:
            raise Failed(f"could not be reached: {type(exc).__name__}") from None
        if resp.status_code != 200:
            after = resp.headers.get("retry-after", "")
            raise Failed(f"HTTP {resp.status_code}", float(after) if after.isdigit() else 0.0)
        try:
            text = resp.json()["choices"][0]["message"]["content"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty review")
        except (ValueError, KeyError, IndexError, TypeError):
            REJECTS.note(LLM_ANSWER, f"{ep.name}: the answer is not a chat completion")
            raise Failed("the answer is not a chat completion") from None
        return text.strip()[:REVIEW_MAX_CHARS], resp.headers.get(PROVIDER_HEADER, ep.name)
