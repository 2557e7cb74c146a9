from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctops_tools.redis_embed import EmbeddedRedis, use_port_range  # noqa: E402

# each pytest-xdist worker hands out ports from its own range (below the kernel's ephemeral ports,
# 32768 and up), so workers never race for one
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    use_port_range(12000 + 2500 * int(_worker[2:]), 12000 + 2500 * int(_worker[2:]) + 2499)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server for the whole run; tests isolate themselves with their own key prefix."""
    r = EmbeddedRedis().start()
    yield r
    r.stop()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    return f"t{os.getpid()}:{request.node.name[:40]}"


from tests.cluster import make_cluster, running_dispatcher  # noqa: E402,F401 - fixtures for every test module
