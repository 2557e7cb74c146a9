"""A wrong or missing setting stops the program at start with a message naming the setting and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ctops import config
from ctops.config import ConfigError

GOOD = """
cluster = "t"
[[dispatchers]]
name = "A"
data = "127.0.0.1:18080"
ops = "127.0.0.1:19080"
[[servers]]
name = "trainer-1"
url = "http://127.0.0.1:18101"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ctops.toml"
    p.write_text(text)
    return p


def test_good_file_loads(tmp_path: Path) -> None:
    dep = config.load(write(tmp_path, GOOD))
    assert dep.dispatcher("A").ops_url == "http://127.0.0.1:19080"
    assert dep.server("trainer-1").address == ("127.0.0.1", 18101)
    assert dep.timings.health_interval_ms == 500  # defaults apply


@pytest.mark.parametrize(("text", "setting"), [
    (GOOD.replace('url = "http://127.0.0.1:18101"', 'url = "ftp://x"'), "servers[0](trainer-1).url"),
    (GOOD.replace('data = "127.0.0.1:18080"', 'data = "nope"'), "dispatchers[0](A).data"),
    (GOOD + "\n[timings]\nfall = 0\n", "timings.fall"),
    (GOOD + "\n[timings]\nhealth_interval_ms = \"fast\"\n", "timings.health_interval_ms"),
    (GOOD + "\n[timings]\nno_such_setting = 1\n", "timings.no_such_setting"),
    ('cluster = "t"\n', "dispatchers"),
    (GOOD + '\n[[tokens]]\nname = "x"\nrole = "root"\nsha256 = "' + "0" * 64 + '"\n', "tokens[0](x).role"),
    (GOOD + '\n[[servers]]\nname = "trainer-1"\nurl = "http://127.0.0.1:1"\n', "servers"),
    (GOOD + '\n[[agents]]\nname = "h"\n[[agents.processes]]\nname = "web"\ncommand = ["x"]\nlisten = "8101"\n',
     "agents[0](h).processes[0](web).listen"),
    (GOOD + '\n[[agents]]\nname = "h"\n[[agents.processes]]\nname = "web"\ncommand = ["x"]\nwarm_spare = true\n',
     "agents[0](h).processes[0](web)"),
])
def test_bad_setting_is_named_with_the_file(tmp_path: Path, text: str, setting: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert f"setting {setting}" in str(err.value) or setting in str(err.value)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "cluster = \n"))


def test_program_stops_at_start_naming_setting_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('ops = "127.0.0.1:19080"', 'ops = "127.0.0.1:99999"'))
    out = subprocess.run([sys.executable, "-m", "ctops_tools.cli", "dispatcher", "--config", str(path), "--name", "A"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert str(path) in out.stderr and "dispatchers[0](A).ops" in out.stderr


def test_agent_without_its_token_env_stops_with_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + '\n[[agents]]\nname = "host-1"\ntoken_env = "CTOPS_TEST_NO_SUCH_TOKEN"\n')
    out = subprocess.run([sys.executable, "-m", "ctops_tools.cli", "agent", "--config", str(path), "--name", "host-1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "CTOPS_TEST_NO_SUCH_TOKEN" in out.stderr and str(path) in out.stderr
