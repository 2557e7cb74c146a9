"""Packaging and running as a service: the wheel (compiled data plane, plain-Python fallback),
`ctops --version`, the systemd units in deploy/systemd, and `--log-format json`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

from ctops import __version__
from ctops_tools.cli import build_parser, main
from ctops_tools.procs import ctops_argv, spawn, stop_all
from tests.cluster import Cluster, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
SERVICES = {"ctops-dispatcher@.service": "dispatcher", "ctops-agent@.service": "agent",
            "ctops-trainer@.service": "trainer"}


def test_version_names_the_release_and_the_data_plane(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ctops {__version__} (data plane: ") and ("Cython" in out or "Python" in out)


# --- systemd units ------------------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's ini dialect: sections, repeated keys kept in order, `#` comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: {raw!r} outside a section or not key=value"
        key, _, val = line.partition("=")
        current.setdefault(key.strip(), []).append(val.strip())
    return sections


@pytest.mark.parametrize("unit", sorted(SERVICES))
def test_unit_is_a_hardened_notify_service_running_a_real_subcommand(unit: str) -> None:
    u = parse_unit(UNITS / unit)
    svc = u["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["Restart"] == ["always"]
    watchdog = svc["WatchdogSec"][0]
    assert watchdog.endswith("s") and float(watchdog[:-1]) >= 2
    assert svc["ProtectSystem"] == ["strict"] and svc["NoNewPrivileges"] == ["yes"] and svc["PrivateTmp"] == ["yes"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    argv = svc["ExecStart"][0].split()
    assert Path(argv[0]).name == "ctops" and argv[1] == SERVICES[unit]
    # the command line is one the installed `ctops` accepts (the instance name stands in for %i)
    args = build_parser().parse_args([a.replace("%i", "x") for a in argv[1:]])
    assert args.command == SERVICES[unit] and args.name == "x" and args.log_format == "json"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd); the units are still "
                    "parsed and checked by the test above")
    ctops_bin = Path(sys.executable).parent / "ctops"
    for unit in SERVICES:
        # an instance of the template, with this checkout's `ctops` (verify checks the binary exists)
        # and its environment file optional (there is none here)
        text = (UNITS / unit).read_text().replace("/opt/ctops/.venv/bin/ctops", str(ctops_bin))
        text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")
        inst = tmp_path / unit.replace("@.", "@x.")
        inst.write_text(text)
        res = subprocess.run([analyze, "verify", str(inst)], capture_output=True, text=True, timeout=60)
        # verify also reports on units the host itself has loaded: only lines naming ours count
        ours = [ln for ln in (res.stdout + res.stderr).splitlines() if inst.name in ln]
        assert res.returncode == 0 or not ours, (unit, res.stdout, res.stderr)
        assert not ours, (unit, ours)


# --- structured logs ----------------------------------------------------------------------------------

def test_log_format_json_writes_one_object_a_line(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(trainers=1)
    log_path = c.root / "logs" / "A-json.log"
    child = spawn("A", ctops_argv("dispatcher", "--config", str(c.config), "--name", "A", "--log-format", "json"),
                  str(log_path), c.env)
    try:
        lines = wait_for("the dispatcher's start-up line", lambda: (
            text := log_path.read_text() if log_path.exists() else "") and "data on" in text
            and text.splitlines(), timeout=60)
    finally:
        stop_all([child])
    docs = [json.loads(ln) for ln in lines if ln.strip()]
    started = next(d for d in docs if "data on" in d["msg"])
    assert started["process"] == "dispatcher[A]" and started["level"] == "INFO"
    assert started["logger"] == "ctops.dispatcher" and started["ts"].endswith("Z") and started["pid"] > 0


# --- the wheel ----------------------------------------------------------------------------------------

def test_wheel_installs_ctops_with_the_compiled_data_plane_and_falls_back_without_it(tmp_path: Path) -> None:
    # from the committed files only (no in-place build, no stale build/ of this checkout), with this
    # checkout's build tools (setuptools, Cython): nothing is downloaded
    src = tmp_path / "ctops-src"  # not "src": setuptools would take it for a src-layout's package folder
    for name in subprocess.check_output(["git", "ls-files"], cwd=ROOT, text=True).splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # the C that Cython made from these sources for `make`, if it is current: translating again is
    # half the build's time and the same work `make` checks
    made = ROOT / "dispatcher" / "proxy.c"
    if made.exists() and made.stat().st_mtime > max((ROOT / "dispatcher" / n).stat().st_mtime
                                                     for n in ("proxy.py", "proxy.pxd")):
        shutil.copy2(made, src / "dispatcher" / "proxy.c")
    wheels = tmp_path / "dist"
    # -O0: the test checks what is packaged, not how fast it runs; it halves the C compiler's time
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(wheels), str(src)], check=True, timeout=900, cwd=tmp_path,
                   env={**os.environ, "CFLAGS": "-O0"})
    (wheel,) = wheels.glob("ctops-*.whl")
    assert "cp311" in wheel.name or "cp3" in wheel.name, f"{wheel.name}: no compiled data plane in the wheel"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "--quiet",
                    str(wheel)], check=True, timeout=300)
    # its dependencies from this checkout's environment, after the wheel's own packages (a .pth
    # entry is appended to sys.path, and the editable install's finder there is not loaded)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def run(*argv: str) -> str:
        return subprocess.run([str(venv / "bin" / "ctops"), *argv], check=True, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path).stdout

    assert run("--version").strip() == f"ctops {__version__} (data plane: compiled (Cython))"
    where = subprocess.check_output([str(py), "-c", "import dispatcher.proxy as p, ctops; print(p.__file__); "
                                     "print(ctops.__file__)"], text=True, cwd=tmp_path).split()
    assert all(w.startswith(str(site)) for w in where), where  # the wheel's code, not this checkout's
    assert where[0].endswith(".so")
    assert "dispatcher" in run("--help")

    # no compiled module (a platform without a build, or one that will not load): plain Python, same CLI
    Path(where[0]).unlink()
    assert run("--version").strip() == f"ctops {__version__} (data plane: plain Python)"
    subprocess.run([str(py), "-c", "from dispatcher.proxy import DataPlane"], check=True, timeout=60, cwd=tmp_path)
