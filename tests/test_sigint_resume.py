"""Ctrl-C in the middle of ``python -m harness run``, then ``--resume``: the records of one clean run.

The run is a real subprocess on the tiny synthetic model; SIGINT arrives as soon as the first
case is on disk (so it lands inside a later case). The CLI must exit 130 with one
``interrupted: ...`` line and no traceback, keep the finished cases, and ``--resume`` must run
only the rest; the final records (case ids, statuses, metric values; timings aside) equal an
uninterrupted in-process run of the same suite. (SIGKILL + resume: tests/test_harness_run.py.)

    .venv/bin/pytest -q tests/test_sigint_resume.py
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from harness.cli import INTERRUPTED
from harness.results import load_results, read_records
from harness.runner import Runner
from harness.suite import load_suite
from test_harness_run import RESUME_SUITE, ROOT, _norm


def _default_sigint():
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # keeps it ignored; a terminal's Ctrl-C reaches a process with the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow(seconds=20)
def test_ctrl_c_then_resume_gives_the_records_of_one_clean_run(tmp_path):
    path = tmp_path / "resume.toml"
    path.write_text(RESUME_SUITE)
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(r["type"] == "case" for r in read_records(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)

    done = sum(r["type"] == "case" for r in read_records(out))
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert 1 <= done < 4, f"SIGINT landed after {done} cases"
    lines = stderr.strip().splitlines()
    assert lines[-1] == INTERRUPTED and "resume" in INTERRUPTED
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr + stdout
    assert sum("interrupted" in line for line in lines) == 1
    assert load_results(out).manifest["finished"] is None

    resumed = subprocess.run(cmd + ["--resume", "--no-progress"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["ran"] == 4 - done

    clean = Runner(load_suite(path), tmp_path / "clean", progress=False).run()
    assert clean.exit_code == 0 and len(clean.cases) == 4
    got, want = _norm(read_records(out)), _norm(read_records(tmp_path / "clean"))
    assert [(r["kv_dtype"], r["check"], r["type"]) for r in got] == \
        [(r["kv_dtype"], r["check"], r["type"]) for r in want]
    assert got == want
    man = load_results(out).manifest
    assert man["finished"] and len(man["resumed"]) == 1


def test_an_interrupt_swallowed_where_it_landed_still_stops_the_run(tmp_path, capsys):
    """Ctrl-C that lands in a weakref callback or ``__del__`` is printed as "Exception ignored"
    and lost (seen once in CI: the run then finished with exit 0). The CLI's handler records it:
    the harness stops at the next case and the CLI exits 130 with its one line."""
    import engine.cli as ecli

    def swallowed(_args):
        try:
            ecli._on_sigint(signal.SIGINT, None)          # what the handler does on Ctrl-C ...
        except KeyboardInterrupt:
            pass                                          # ... swallowed where it landed
        path = tmp_path / "resume.toml"
        path.write_text(RESUME_SUITE)
        Runner(load_suite(path), tmp_path / "out", progress=False).run()
        return 0
    # the handler in place before (a background job of a non-interactive shell starts with
    # SIGINT ignored, so not always default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    assert ecli.run_guarded(swallowed, None, interrupted=INTERRUPTED) == 130
    assert capsys.readouterr().err.strip() == INTERRUPTED
    assert not any(r["type"] == "case" for r in read_records(tmp_path / "out"))   # stopped before a case
    assert signal.getsignal(signal.SIGINT) is before                                # handler restored
    ecli.check_interrupt()              # the interrupt belonged to that run: nothing left to raise later
