"""Shared fixtures: generated test models (cached per session), a real ggml-rpc device, the CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("rotary-gguf"))
sys.path.insert(0, str(REPO / "tools"))

from synthetic_models import make_model  # noqa: E402

# The suite keeps its own user cache (calibrations, bench's draft verdicts, Hub headers), shared by
# every test and the CLI processes they start, and never touches the user's: a calibration measured
# once under other load must not decide this run's plans, and a run must leave nothing behind.
_USER_CACHE = tempfile.mkdtemp(prefix="rotary-gguf-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _USER_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_USER_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def test_model(tmp_path_factory):
    """test_model(**make_model kwargs) -> path of a generated GGUF, built once per session."""
    folder = tmp_path_factory.mktemp("models")
    built: dict[tuple, Path] = {}

    def build(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            name = "-".join(f"{k}={v}" for k, v in key) or "default"
            built[key] = make_model(folder / f"{name}.gguf", **kwargs)
        return built[key]

    return build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc_server():
    """Start a real ggml-rpc server serving this machine's CPU on a free port (one thread); yield
    its endpoint once it answers, and stop it afterwards."""
    from rotary_gguf import native
    from rotary_gguf.errors import UserError

    endpoint = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [CLI, "rpc-device", "--port", endpoint.rsplit(":", 1)[1], "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            native.probe_rpc(endpoint, timeout=1)
            break
        except UserError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the rpc-device server did not start")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def rpc_endpoint():
    """A real ggml-rpc server serving this machine's CPU: the simulated accelerator."""
    yield from _rpc_server()


@pytest.fixture(scope="session")
def second_rpc_endpoint():
    """Another real ggml-rpc server on another port: a second simulated accelerator."""
    yield from _rpc_server()


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `rotary-gguf` console script and capture its output."""
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The CLI failed the way users should see it: exit 2, one 'error:' line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
