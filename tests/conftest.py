from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctops_tools.forkserver import ForkServer  # noqa: E402
from ctops_tools.localcluster import use_spawner  # noqa: E402
from ctops_tools.redis_embed import EmbeddedRedis, use_port_range  # noqa: E402

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
    "test_redis_embed.py", "test_redis_files.py", "test_sandbox.py", "test_metrics.py",
    "test_packaging.py::test_units_pass_systemd_analyze_verify",
    "test_packaging.py::test_wheel_installs_ctops_with_the_compiled_data_plane_and_falls_back_without_it",
    "test_config.py::test_program_stops_at_start_naming_setting_and_file",
    "test_config.py::test_agent_without_its_token_env_stops_with_a_clear_message",
    "test_process_states.py",
    "test_watchdog.py::test_frozen_checker_is_replaced_and_supervision_goes_on",
    "test_console.py::test_sighup_exits_cleanly_with_the_terminal_still_open",
    "test_console.py::test_terminal_gone_without_a_sighup_exits_cleanly",
    "test_fake_llm.py::test_a_fake_started_without_a_token_refuses_every_switch",
    "test_security.py::test_a_token_scope_that_names_nothing_stops_the_program",
    "test_store_ha.py::test_no_new_leader_until_a_replica_has_the_epoch",
    "test_store_ha.py::test_writes_wait_for_a_replica_learner_refused_staff_kept",
    "test_store_ha.py::test_store_started_again_on_its_workdir_comes_back_as_it_was_left",
    "test_trainer.py::test_store_loss_is_a_json_503_with_retry_after_and_only_readiness_reports_it",
    "test_trainer.py::test_unknown_server_name_is_a_clear_error",
    "test_watchdog.py::test_a_socket_handed_to_another_pid_is_not_taken",
    # README-claim tests of helper "claims", merged alongside
    "test_claims_sdnotify.py", "test_claims_loopwatch.py::test_a_blocked_event_loop_makes_the_process_exit",
    "test_cli.py::test_usage_and_store_errors_have_their_codes",
    "test_claims_loopwatch.py::test_chaos_block_stops_the_event_loop_and_the_guard_exits",
    "test_forkserver.py",
    "test_cluster_teardown.py",
}


# Tests whose outcome depends on having the CPU to themselves: Redis paused or frozen under a
# cluster, LLM requests hedged after a stall, sandbox runs against their CPU and process budgets.
# `make test` runs them after the rest, one at a time.
SERIAL_TESTS = {
    "test_leadership.py::test_redis_pauses_never_make_two_leaders",
    "test_store_outage.py::test_frozen_redis_restarts_nothing_and_is_reported_as_shared_state",
    "test_store_outage.py::test_the_leader_keeps_leading_after_a_store_outage",
    "test_llm_pool.py::test_primary_500s_then_hangs_requests_keep_succeeding_without_waiting",
    "test_llm_pool.py::test_healthy_primary_that_hangs_is_hedged_and_breaker_opens_after_three",
    "test_sandbox.py::test_fork_bomb_is_stopped_and_the_next_run_is_fine",
    "test_sandbox.py::test_parallel_runs_do_not_disturb_each_other",
    "test_sandbox.py::test_memory_budget_is_for_the_whole_run",
    "test_claims_outage.py",  # freezes Redis under a cluster
}


def _listed(item: pytest.Item, table: set[str]) -> bool:
    module = item.path.name
    return module in table or f"{module}::{getattr(item, 'originalname', item.name)}" in table


def _starts_processes(item: pytest.Item) -> bool:
    return _listed(item, PROCESS_TESTS) or bool(set(getattr(item, "fixturenames", ())) & PROCESS_FIXTURES)


# Seconds a module takes on its own, one at a time on the 2-core machine (rounded; those measured while
# the machine was busy scaled down). pytest-xdist hands out work in collection order, so the longest
# pieces go first and short ones fill the gaps at the end: a module that stays on one worker is one
# piece, the other modules' tests are pieces of their own (each counted at the module's average).
# A module not listed counts as a middling one.
MODULE_SECONDS = {
    "test_store_ha.py": 70, "test_leadership.py": 60, "test_console_ops.py": 54, "test_security.py": 45,
    "test_store_sentinel.py": 45, "test_failover.py": 44, "test_agent.py": 41, "test_trainer.py": 40,
    "test_console.py": 39, "test_store_outage.py": 35, "test_integrity_events.py": 35, "test_demo.py": 33,
    "test_llm_pool.py": 31, "test_notifications.py": 30, "test_status_exit.py": 30, "test_integrity.py": 28,
    "test_proxy.py": 28, "test_ops_schema.py": 25, "test_watchdog.py": 25, "test_exceptions_console.py": 25,
    "test_diagnosis.py": 24, "test_bench_store_failover.py": 19, "test_health.py": 18, "test_ops_api.py": 18,
    "test_exceptions_api.py": 17, "test_checkpoints.py": 17, "test_console_store.py": 16, "test_sandbox.py": 15,
    "test_spool.py": 14, "test_loopwatch.py": 12, "test_llm_errors.py": 11, "test_degraded.py": 11,
    "test_fake_llm.py": 9, "test_envelope.py": 9, "test_idempotency.py": 9, "test_sdnotify.py": 8,
    "test_redis_embed.py": 8, "test_capture.py": 7, "test_redis_files.py": 6, "test_integrity_contain.py": 6,
    "test_backup.py": 5, "test_import_contracts.py": 4, "test_config.py": 4, "test_integrity_console.py": 3,
}
UNLISTED_SECONDS = 15
# Single tests far longer than their module's average (same scale), so they start early rather than
# be the last thing a worker runs while the others have finished ("module.py::name", any parametrization)
TEST_SECONDS = {
    "test_ops_schema.py::test_ops_api_conforms_to_its_openapi_document": 37,
    "test_exceptions_console.py::test_trainer_exception_shows_with_its_traceback_and_can_be_triaged": 36,
    "test_store_sentinel.py::test_replica_stopped_and_primary_killed": 27,
    "test_spare_state.py::test_spare_state_through_a_crash_and_a_lost_spare": 23,
    "test_store_sentinel.py::test_failover_from_the_console_is_confirmed_and_audited": 21,
    "test_console_ops.py::test_restart_process_from_console": 20,
    "test_demo.py::test_headless_demo_status_chaos_and_clean_stop": 19,
    "test_herd.py::test_leader_kill_under_a_herd_loses_no_host": 17,
    "test_demo.py::test_demo_started_again_on_its_workdir_keeps_tokens_ports_and_state": 17,
    "test_console_ops.py::test_switchover_from_console_is_confirmed_and_audited": 16,
    "test_store_ha.py::test_acknowledged_writes_survive_a_primary_fault_with_one_leader": 15,
    "test_exceptions_console.py::test_live_tail_follows_pauses_and_filters": 15,
}


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(d.scope in ("module", "class", "package") for fixturedefs in defs for d in fixturedefs)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    per_module = Counter(item.path.name for item in items)
    weight: dict[str, float] = {}
    for item in items:
        seconds = MODULE_SECONDS.get(item.path.name, UNLISTED_SECONDS)
        # under `--dist loadgroup` a module whose tests share a fixture (its cluster, its fake) stays on
        # one worker, and the tests of the others spread over all workers
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
            weight[item.nodeid] = seconds
        else:
            long_one = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
            weight[item.nodeid] = TEST_SECONDS.get(long_one, seconds / per_module[item.path.name])
    items.sort(key=lambda item: -weight[item.nodeid])  # stable: a module's tests keep their order
    for item in items:
        item.add_marker(pytest.mark.cluster if _starts_processes(item) else pytest.mark.pure)
        if _listed(item, SERIAL_TESTS):
            item.add_marker(pytest.mark.serial)


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


@pytest.fixture(scope="session", autouse=True)
def _cluster_processes_forked() -> Iterator[None]:
    """Cluster processes are forked from a process that has imported ctops already (see
    ctops_tools/forkserver.py): the same code from `main` on, without half a second of imports each.
    CTOPS_TEST_EXEC=1 execs each one, as `ctops demo` and production do."""
    if os.environ.get("CTOPS_TEST_EXEC") == "1":
        yield
        return
    server = ForkServer()
    use_spawner(server.spawn)
    _fork_server.append(server)
    yield
    _fork_server.clear()
    use_spawner(None)
    server.close()


_fork_server: list[ForkServer] = []


@pytest.fixture
def exec_processes() -> Iterator[None]:
    """This test's cluster processes are exec'd children of the test itself, not the fork server's:
    for a test that ptraces one (a tracer that is not the parent holds the exit of a process that
    dies while stopped, and the parent's wait for it never ends)."""
    use_spawner(None)
    yield
    use_spawner(_fork_server[0].spawn if _fork_server else None)


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
