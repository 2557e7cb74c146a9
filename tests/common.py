"""What several test modules share: a correct learner solution, and a wait for a process's HTTP port."""

from __future__ import annotations

import subprocess
import time

import httpx

FIZZBUZZ_GOOD = """
def fizzbuzz(n):
    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    return str(n)
"""


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until `url` answers (any status below 500); fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer in {timeout}s")
