"""Ask the first LLM provider for a short review. The review is a bonus: any failure becomes
{"status": "unavailable"} with a reason, never a failed submission."""

from __future__ import annotations

import httpx

from ctops.config import LLMProviderSpec
from trainer.exercises import Exercise

CODE_MAX_CHARS = 6000
REVIEW_MAX_CHARS = 4000

SYSTEM = ("You are a friendly programming tutor. Review the learner's Python code in at most 5 short "
          "sentences: say what is good, what is wrong and give one hint. Do not write the full solution.")


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


def unavailable(reason: str, provider: str | None) -> dict:
    return {"status": "unavailable", "provider": provider,
            "text": f"The automatic review is unavailable right now ({reason}). Your test results are complete."}


async def review(client: httpx.AsyncClient, provider: LLMProviderSpec | None, exercise: Exercise, code: str,
                 result: dict) -> dict:
    if provider is None:
        return unavailable("no LLM provider is configured", None)
    body = {
        "model": provider.model,
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": prompt(exercise, code, result)}],
        "max_tokens": 300,
        "temperature": 0.2,
    }
    url = provider.base_url.rstrip("/") + "/chat/completions"
    try:
        resp = await client.post(url, json=body, headers={"Authorization": f"Bearer {provider.api_key}"},
                                 timeout=provider.timeout_ms / 1000)
    except httpx.TimeoutException:
        return unavailable(f"{provider.name} did not answer within {provider.timeout_ms} ms", provider.name)
    except httpx.HTTPError as exc:
        return unavailable(f"{provider.name} could not be reached: {type(exc).__name__}", provider.name)
    if resp.status_code != 200:
        return unavailable(f"{provider.name} answered HTTP {resp.status_code}", provider.name)
    try:
        text = resp.json()["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty review")
    except (ValueError, KeyError, IndexError, TypeError):
        return unavailable(f"{provider.name} sent an answer that is not a chat completion", provider.name)
    return {"status": "done", "provider": provider.name, "text": text.strip()[:REVIEW_MAX_CHARS]}
