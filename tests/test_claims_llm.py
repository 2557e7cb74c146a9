"""README claim: with `[trainer] llm = "dispatcher"` the trainers ask for reviews through the
dispatcher's LLM pool; when no provider answers, submissions finish with their test results at once
and the review is filled in later, once. Real trainer, dispatcher and fake providers."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.cluster import Cluster, wait_for
from tests.trainer_cluster import GOOD, fake_stats, get, new_session, poll_done, post, set_mode, step_names

TOML = """
[trainer]
llm = "dispatcher"
review_budget_ms = 4000
review_retry_initial_ms = 300
review_retry_max_ms = 1500
"""


def pool_requests(c: Cluster) -> int:
    """Requests the dispatcher's LLM pool has sent to providers (probes not counted)."""
    r = httpx.get(c.ops_url() + "/api/v1/llm/providers", headers=c.auth("viewer"), timeout=10)
    return sum(p["requests"] for p in r.json()["providers"])


def test_reviews_through_the_dispatchers_pool_and_degraded_mode(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(trainers=1, extra_toml=TOML)
    c.start_all()
    base = c.data_url()  # as a learner's browser: through the dispatcher's data port
    sid = new_session(base)
    before = {p: fake_stats(c, p).get("status_200", 0) for p in ("primary", "secondary")}
    asked = pool_requests(c)
    done = poll_done(base, sid, post(base, sid, GOOD).json()["submission_id"])
    assert done["verdict"] == "passed" and done["review"]["status"] == "done", done["review"]
    assert "[primary]" in done["review"]["text"] and done["review"]["provider"] == "primary", done["review"]
    assert fake_stats(c, "primary").get("status_200", 0) == before["primary"] + 1
    assert pool_requests(c) == asked + 1, "the review went through the dispatcher's pool"

    # the pool fails over for the trainer: the primary broken, the review comes from the secondary
    set_mode(c, "primary", "500")
    done = poll_done(base, sid, post(base, sid, GOOD).json()["submission_id"])
    assert done["review"]["status"] == "done" and "[secondary]" in done["review"]["text"], done["review"]

    # no provider answers: test results at once, the review pending, then filled in once
    set_mode(c, "secondary", "500")
    subs = [post(base, sid, GOOD).json()["submission_id"] for _ in range(2)]
    pending = [poll_done(base, sid, s) for s in subs]
    for d in pending:
        assert d["verdict"] == "passed" and len(d["tests"]) == 5
        assert d["review"]["status"] == "pending", d["review"]
        assert step_names(d)[-1] == "done" and "review_deferred" in step_names(d)
    def answered() -> int:
        return sum(fake_stats(c, p).get("status_200", 0) for p in ("primary", "secondary"))

    ok_before = answered()
    set_mode(c, "primary", "ok")
    set_mode(c, "secondary", "ok")
    filled = [wait_for(f"review of {s}", lambda s=s: (d := get(base, sid, s))["review"]["status"] == "done" and d, 90)
              for s in subs]
    for d in filled:
        # whichever provider's breaker closed first fills it; the text names the one recorded
        provider = d["review"]["provider"]
        assert provider in ("primary", "secondary") and f"[{provider}]" in d["review"]["text"], d["review"]
        assert step_names(d).count("review_received") == 1, d
    # once each: one answered provider call per pending review (the pool may have probed meanwhile,
    # but a probe is not a review)
    wait_for("the fills counted", lambda: answered() >= ok_before + len(subs))
    assert all(step_names(get(base, sid, s)).count("review_received") == 1 for s in subs)
