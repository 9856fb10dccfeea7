"""Shared by the engine adapter tests that need the llama.cpp build (``make test-engines``).

``engines_only`` (autouse in those modules) skips them unless pytest runs with ``-m engines``,
so ``make test`` stays fast and needs no build; ``llama_server(...)`` starts llama-cpp-python's
own OpenAI-compatible server on a free loopback port and stops it. No tests here.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def engines_only(request):
    # module scope: pytest sets up higher-scoped fixtures first, so a function-scoped skip came
    # after a module's server fixture had already tried to start llama.cpp (errors in make test)
    if "engines" not in (request.config.getoption("-m") or ""):
        pytest.skip("needs the llama.cpp build: runs in make test-engines (pytest -m engines)")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built: make llama-cpp")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def llama_server(model_path, *args: str, timeout: float = 120):
    """llama-cpp-python's server (``python -m llama_cpp.server``) on 127.0.0.1:<free port>;
    yields ``openai://127.0.0.1:<port>``."""
    port = free_port()
    log = open(os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                             "--host", "127.0.0.1", "--port", str(port), "--verbose", "false", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > timeout:
                    raise RuntimeError(f"llama_cpp.server did not come up on port {port} (rc {proc.poll()})")
                time.sleep(0.5)
        yield f"openai://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
