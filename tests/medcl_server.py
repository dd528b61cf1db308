"""A real medcl-serve process on 127.0.0.1 for the tests: started on a free port, stopped (or killed) after.

Importable by any test: ``from tests.medcl_server import running_server``.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
URL_LINE = re.compile(r"at (http://127\.0\.0\.1:\d+)")
START_TIMEOUT = 60.0


@dataclass
class RunningServer:
    url: str
    token: str | None
    process: subprocess.Popen


@contextlib.contextmanager
def running_server(
    *args: str, token: str | None = None, token_dir: Path | None = None
) -> Iterator[RunningServer]:
    """medcl-serve with ``args`` (plus --port 0 on 127.0.0.1, and --token-file with ``token`` or --no-token),
    until the with-block ends; its stderr is shown when it fails to start."""
    command = [sys.executable, "-m", "napari_medcl.serve", "--host", "127.0.0.1", "--port", "0", *args]
    if token is None:
        command.append("--no-token")
    else:
        assert token_dir is not None
        token_file = token_dir / "token.txt"
        token_file.write_text(token + "\n", encoding="utf-8")
        command += ["--token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # stderr into a file: a pipe nobody reads would block the server once full.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (closed in the finally below)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
    try:
        url = _wait_for_url(process, log)
        yield RunningServer(url=url, token=token, process=process)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        log.close()


def _wait_for_url(process: subprocess.Popen, log) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen = []
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = URL_LINE.search(line)
            if match:
                return match.group(1)
        elif process.poll() is not None:
            break
    process.kill()
    process.wait(timeout=10)
    log.seek(0)
    raise RuntimeError(f"medcl-serve did not start: {''.join(seen)} {log.read()}")
