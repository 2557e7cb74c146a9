from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctops.redis_embed import EmbeddedRedis, use_port_range  # noqa: E402

# each pytest-xdist worker hands out ports from its own range (below the kernel's ephemeral ports,
# 32768 and up), so workers never race for one
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    use_port_range(12000 + 2500 * int(_worker[2:]), 12000 + 2500 * int(_worker[2:]) + 2499)


# --- markers: `pure` (in this process only) or `cluster` (Redis, services or other processes) ------

# Fixtures that start processes: a test using any of them, directly or through another fixture, is
# a cluster test.
PROCESS_FIXTURES = {"redis_server", "make_cluster", "backends", "fake", "fakes", "busy_fake", "store", "make_sup"}
# Tests that start processes in their own body (or in a helper it calls): whole modules, or single
# tests as "module.py::name" (any parametrization).
PROCESS_TESTS = {
    "test_backup.py", "test_bench_store_failover.py", "test_demo.py", "test_import_contracts.py",
    "test_redis_embed.py", "test_redis_files.py", "test_sandbox.py",
    "test_config.py::test_program_stops_at_start_naming_setting_and_file",
    "test_config.py::test_agent_without_its_token_env_stops_with_a_clear_message",
    "test_console.py::test_sighup_exits_cleanly",
    "test_console.py::test_terminal_gone_without_a_sighup_exits_cleanly",
    "test_fake_llm.py::test_a_fake_started_without_a_token_refuses_every_switch",
    "test_security.py::test_a_token_scope_that_names_nothing_stops_the_program",
    "test_store_ha.py::test_no_new_leader_until_a_replica_has_the_epoch",
    "test_store_ha.py::test_writes_wait_for_a_replica_learner_refused_staff_kept",
    "test_store_ha.py::test_store_started_again_on_its_workdir_comes_back_as_it_was_left",
    "test_trainer.py::test_store_loss_is_a_json_503_with_retry_after_and_only_readiness_reports_it",
    "test_trainer.py::test_unknown_server_name_is_a_clear_error",
    "test_watchdog.py::test_a_socket_handed_to_another_pid_is_not_taken",
}


def _starts_processes(item: pytest.Item) -> bool:
    module = item.path.name
    name = getattr(item, "originalname", item.name)
    fixtures = set(getattr(item, "fixturenames", ()))
    return module in PROCESS_TESTS or f"{module}::{name}" in PROCESS_TESTS or bool(fixtures & PROCESS_FIXTURES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.cluster if _starts_processes(item) else pytest.mark.pure)


@pytest.fixture(autouse=True)
def _pure_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked pure that starts a process fails at once, so `make test-pure` stays in-process
    (and a new test that starts one is told to say so in PROCESS_TESTS above)."""
    if request.node.get_closest_marker("pure") is None:
        return
    where = request.node.nodeid

    def refuse(self: subprocess.Popen, args: object, *rest: object) -> None:
        raise AssertionError(f"{where} is marked pure but starts a process ({args!r}); "
                             "list it in PROCESS_TESTS in tests/conftest.py")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server for the whole run; tests isolate themselves with their own key prefix."""
    r = EmbeddedRedis().start()
    yield r
    r.stop()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    return f"t{os.getpid()}:{request.node.name[:40]}"


from tests.cluster import make_cluster, running_dispatcher, shared_standard  # noqa: E402,F401 - fixtures for every test module
