"""Which process measured each case (harness.results.case_origin), and the report's note where a
table's rows come from different ones: a resumed run's speeds, measured by other processes that
may run other code on other machines, must not read as one comparison of KV dtypes.

A process's runtime environment (allocator configuration, thread counts: harness.results.RUNTIME_ENV)
is part of what must match. The run here is real (tiny-qwen3 on the CPU: one process measures fp32, a second, resumed, the
other dtypes); the older-records case is the same run's records without their process tags (as
results written before the tags existed); ``origins_note`` itself is also checked on manifests
that differ only in what decides comparability."""
from __future__ import annotations

import json
import time

from harness.report import build_report
from harness.results import case_origin, git_info, load_results, origins_note, read_records, runtime_env
from harness.runner import Runner
from harness.suite import load_suite

SUITE = """
[suite]
name = "origins"
models = ["tiny-qwen3"]
kv_dtypes = ["bf16", "q8_0"]
baseline = "fp32"
ctx = 512

[[check]]
kind = "throughput"
pp = 16
tg = 4
repeats = 5
warmup = 0
"""


def test_a_resumed_runs_rows_name_their_processes_and_the_report_says_so(tmp_path):
    path = tmp_path / "origins.toml"
    path.write_text(SUITE)
    out = tmp_path / "run"
    first = Runner(load_suite(path), out, progress=False, max_cases=1).run()
    assert len(first.cases) == 1
    time.sleep(1.1)         # the resume's session starts in a later second than the first case ended
    Runner(load_suite(path), out, progress=False, resume=True).run()
    res = load_results(out)
    cases = {c["kv_dtype"]: c for c in res.cases()}
    assert set(cases) == {"fp32", "bf16", "q8_0"}
    procs = {d: c["process"] for d, c in cases.items()}
    git = git_info()
    for p in procs.values():
        assert p["git"] == git["sha"] and p["dirty"] == git["dirty"] and p["host"] and p["started"]
        assert p["env"] == runtime_env()
    assert res.manifest["runtime_env"] == runtime_env()
    # one process measured fp32, another (the resume) the narrowed rows: pids and starts differ
    assert (procs["fp32"]["pid"], procs["fp32"]["started"]) != (procs["bf16"]["pid"], procs["bf16"]["started"])
    assert procs["bf16"] == procs["q8_0"]

    build_report(out, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "resumed 1 time(s)" in md
    if git["sha"] and not git["dirty"]:     # a clean checkout (CI): same commit and machine, said plainly
        assert "Rows measured by different processes of this resumed run, same clean commit, machine" in md
        assert "Rows not comparable" not in md
    else:                                   # a dirty tree: its sha does not name the code
        assert "**Rows not comparable**" in md
    assert md.count("fp32: git") >= 2 and "bf16, q8_0: git" in md    # the throughput table and the summary

    # the same records as results written before the tags: attributed to the run's sessions by time
    recs = read_records(out)
    for r in recs:
        r.pop("process", None)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    old = load_results(out)
    origins = {c["kv_dtype"]: case_origin(old.manifest, c) for c in old.cases()}
    assert origins["fp32"]["started"] == old.manifest["started"]
    assert origins["bf16"]["started"] == origins["q8_0"]["started"] == old.manifest["resumed"][0]["at"]
    build_report(out, tmp_path / "report-old")
    md = (tmp_path / "report-old" / "report.md").read_text()
    assert "**Rows not comparable**" in md and "run session started" in md


def _case(d, **proc):
    return {"kv_dtype": d, "finished": "2026-12-06T05:00:00+00:00",
            "process": {"pid": 1, "started": "2026-12-06T04:00:00+00:00", "git": "a" * 40, "dirty": False,
                        "host": "h", "gpu": "H100", **proc}}


def test_origins_note_names_what_differs():
    man = {"started": "2026-12-06T04:00:00+00:00", "git": {"sha": "a" * 40, "dirty": False}}
    same = {"fp32": _case("fp32"), "q8_0": _case("q8_0")}
    assert origins_note(man, same) is None
    other_pid = {"fp32": _case("fp32"), "q8_0": _case("q8_0", pid=2, started="2026-12-06T04:30:00+00:00")}
    assert origins_note(man, other_pid).startswith("Rows measured by different processes")
    for change in ({"git": "b" * 40}, {"host": "other"}, {"gpu": "H200"}, {"env": {"OMP_NUM_THREADS": "1"}}):
        note = origins_note(man, {"fp32": _case("fp32"), "q8_0": _case("q8_0", pid=2, **change)})
        assert note.startswith("**Rows not comparable**"), change
    # a dirty tree: the same sha in two processes is not the same code
    dirty = {"fp32": _case("fp32", dirty=True), "q8_0": _case("q8_0", pid=2, dirty=True)}
    assert origins_note(man, dirty).startswith("**Rows not comparable**")
    assert origins_note(man, {"fp32": _case("fp32", dirty=True), "q8_0": _case("q8_0", dirty=True)}) is None
