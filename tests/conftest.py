from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctops.redis_embed import EmbeddedRedis  # noqa: E402


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
