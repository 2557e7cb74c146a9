"""The ops API answers as its OpenAPI document says: schemathesis generates requests for every
operation (a fixed seed, a bounded number per operation) against a real dispatcher with an operator
token, and fails on any 5xx, an undeclared status, a wrong content type or a body off its schema.

Destructive actions (step-down, disabling servers) are fine here: the cluster is thrown away."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.cluster import Cluster, wait_for

# generated requests may change anything an operator may
pytestmark = pytest.mark.own_cluster

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
PER_OPERATION = 12  # 21 operations: a few hundred requests in all


def run_operation(op: Any, base_url: str, headers: dict[str, str], failures: list[str]) -> int:
    calls = 0

    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(max_examples=PER_OPERATION, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case: schemathesis.Case) -> None:
        nonlocal calls
        calls += 1
        try:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failure goes in the report
            parts = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
            failures.append(f"{case.method} {case.formatted_path}: "
                            + "; ".join(f"{type(p).__name__}: {str(p).strip()[:400]}" for p in parts))

    one()
    return calls


def test_ops_api_conforms_to_its_openapi_document(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    doc = httpx.get(c.ops_url() + "/api/v1/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    calls = 0
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        calls += run_operation(op, c.ops_url(), c.auth("operator"), failures)
        # the routes an operator may not use, once more with the credential that may
        if op.path.startswith(("/api/v1/heartbeat", "/api/v1/agents/")) or op.path == "/api/v1/exceptions":
            calls += run_operation(op, c.ops_url(), c.auth("agent"), failures)
        elif op.path == "/api/v1/peer/heartbeat":
            calls += run_operation(op, c.ops_url(), c.auth("peer"), failures)
    assert operations >= 20 and calls >= 250, (operations, calls)
    assert not failures, "\n\n".join(dict.fromkeys(failures))  # each distinct failure once
    # the dispatcher is still there and serving
    assert httpx.get(c.ops_url() + "/api/v1/whoami", headers=c.auth("viewer"), timeout=5).status_code == 200


def test_every_error_status_is_declared_in_the_one_error_shape(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(trainers=1)
    c.start("A")  # the document needs no trainer
    doc = wait_for("the OpenAPI document", lambda: httpx.get(c.ops_url() + "/api/v1/openapi.json", timeout=5).json())
    assert "HTTPValidationError" not in str(doc)  # FastAPI's own 422 shape is never answered
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            declared = {int(s) for s in op["responses"]}
            assert {400, 401, 403, 413, 422, 429, 503} <= declared, (method, path, declared)
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), (method, path, status, ref)
