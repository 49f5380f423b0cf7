"""Runner processes for tests: `python -m shoal.runner` started as the worker starts it, its
status lines collected, and the `launch` fixture (tests/conftest.py) that kills them after."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.runner.spec import RunnerSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunnerProcess:
    """One `python -m shoal.runner` process and the status lines it printed."""

    def __init__(self, spec: RunnerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log = log_dir / f"{spec.instance_id}-rank{spec.rank}.log"
        env = {**os.environ, "SHOAL_TORCH_THREADS": "1", "SHOAL_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.runner", "--spec-json", spec.model_dump_json()],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env=env,
        )
        self.lines: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    @property
    def statuses(self) -> list[str]:
        return [line["status"] for line in self.lines]

    def wait_status(self, status: str, timeout: float) -> dict:
        """The first line with this status; fails the test with the runner's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line["status"] == status:
                    return line
            if self.proc.poll() is not None and not any(s == status for s in self.statuses):
                time.sleep(0.2)  # the reader may still hold the last line
                if not any(s == status for s in self.statuses):
                    break
            time.sleep(0.05)
        pytest.fail(
            f"rank {self.spec.rank} did not report {status!r} within {timeout} s; it said "
            f"{self.lines}; log tail:\n{self.log_tail()}"
        )

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {self.spec.rank} did not exit in {timeout} s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
