"""What a hostile new user hit (issue 16, point 9), kept closed: each case runs the real CLI
(``python -m engine ...`` / ``python -m harness ...``) in a subprocess and holds it to the
contract: exit 2 with one ``error: `` line naming what was wrong (no traceback, never exit 3),
and nothing lost or half-written that a later run would trust. Classes covered here:

- GGUF metadata: ``rms_eps`` NaN/inf/<= 0, ``rope_base`` <= 0/NaN, a string where a number
  belongs (and, in-process, every numeric key ``ModelSpec.from_gguf`` reads);
- engine CLI counts: ``bench --repeats 0`` / ``--prompt-tokens 0``, ``generate
  --max-new-tokens -3``, ``--ctx 0``; a short ``--prompt-tokens`` that used to crash bench;
- ``harness run`` with one ``--model`` twice, or an ``--out`` that is a file;
- results readers: manifest of schema 99 or a JSON list, a record without ``model``, non-UTF-8
  bytes, a record that is not an object;
- ``merge --out DIR`` holding a run (refused; ``--force`` replaces and says what), ``--out FILE``;
- paths: an unwritable ``--out`` (EACCES), a directory where a file goes (EISDIR), a full disk
  (ENOSPC: /dev/full, and a real 64 KiB tmpfs filled up, in a private mount namespace when
  ``unshare`` can make one), a read-only filesystem (EROFS), a closed stdout (``| head``: quiet
  exit 141);
- two processes on one results directory: ``RunLock`` refuses the second with the holder's pid;
- ``compare``: gates that held in base and are not measured in head, missing / incomplete /
  ``n/a`` cases, and runs of different suites (exit 1 unless ``--allow-suite-change``).

    .venv/bin/pytest -q tests/test_hostile.py
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.errors import ModelFileError
from engine.gguf_io import GGUFFile
from engine.spec import ModelSpec
from harness.errors import ResultsError
from harness.results import MANIFEST, RECORDS, RecordWriter, RunLock, load_results, read_records
from test_cli_errors import ROOT, SHAPES, _without_file_override, assert_user_error, run_cli
from test_harness_results import make_run

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# -- GGUF metadata ------------------------------------------------------------------------------
BASE_META = {
    "llama.block_count": ("uint32", 1), "llama.embedding_length": ("uint32", 8),
    "llama.attention.head_count": ("uint32", 2), "llama.attention.head_count_kv": ("uint32", 1),
    "llama.feed_forward_length": ("uint32", 16), "llama.context_length": ("uint32", 64),
}


def write_meta_gguf(path: Path, **override) -> Path:
    """The tiny llama of test_cli_errors with metadata keys overridden: ``override`` maps a key
    (dots as ``__``) to (writer type, value), e.g. ``llama__rope__freq_base=("float32", -1.0)``."""
    meta = {**BASE_META, **{k.replace("__", "."): v for k, v in override.items()}}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in meta.items():
        getattr(w, f"add_{kind}")(key, value)
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


EPS = "llama__attention__layer_norm_rms_epsilon"
ROPE = "llama__rope__freq_base"
BAD_META = {
    # id: ({key: (type, value)}, the metadata key the message must name)
    "eps-nan": ({EPS: ("float32", math.nan)}, "llama.attention.layer_norm_rms_epsilon"),
    "eps-inf": ({EPS: ("float32", math.inf)}, "llama.attention.layer_norm_rms_epsilon"),
    "eps-zero": ({EPS: ("float32", 0.0)}, "llama.attention.layer_norm_rms_epsilon"),
    "eps-negative": ({EPS: ("float32", -1e-5)}, "llama.attention.layer_norm_rms_epsilon"),
    "eps-one": ({EPS: ("float32", 1.0)}, "llama.attention.layer_norm_rms_epsilon"),
    "eps-string": ({EPS: ("string", "1e-5")}, "llama.attention.layer_norm_rms_epsilon"),
    "rope-negative": ({ROPE: ("float32", -10000.0)}, "llama.rope.freq_base"),
    "rope-zero": ({ROPE: ("float32", 0.0)}, "llama.rope.freq_base"),
    "rope-nan": ({ROPE: ("float32", math.nan)}, "llama.rope.freq_base"),
    "rope-string": ({ROPE: ("string", "abc")}, "llama.rope.freq_base"),
    "ctx-float": ({"llama__context_length": ("float32", 64.5)}, "llama.context_length"),
    "ctx-zero": ({"llama__context_length": ("uint32", 0)}, "llama.context_length"),
    "ctx-string": ({"llama__context_length": ("string", "64")}, "llama.context_length"),
    "kv-heads-zero": ({"llama__attention__head_count_kv": ("uint32", 0)}, "llama.attention.head_count_kv"),
    "kv-heads-bool": ({"llama__attention__head_count_kv": ("bool", True)}, "llama.attention.head_count_kv"),
    "layers-string": ({"llama__block_count": ("string", "1")}, "llama.block_count"),
    "norm-topk-string": ({"llama__expert_weights_norm": ("string", "yes")}, "llama.expert_weights_norm"),
    "eos-out-of-vocab": ({"tokenizer__ggml__eos_token_id": ("uint32", 10**6)}, "tokenizer.ggml.eos_token_id"),
    "bos-negative": ({"tokenizer__ggml__bos_token_id": ("int32", -1)}, "tokenizer.ggml.bos_token_id"),
}


def test_good_metadata_is_read(tmp_path):
    # the control: the same writer with plausible values gives a spec with those values
    p = write_meta_gguf(tmp_path / "ok.gguf", **{EPS: ("float32", 1e-5), ROPE: ("float32", 5e5)},
                        llama__expert_weights_norm=("bool", False))
    spec = ModelSpec.from_gguf(GGUFFile(p))
    assert spec.rms_eps == pytest.approx(1e-5) and spec.rope_base == 5e5 and spec.ctx_train == 64
    assert spec.moe_norm_topk is False


@pytest.mark.parametrize("case", list(BAD_META))
def test_bad_metadata_is_a_model_file_error(tmp_path, case):
    override, key = BAD_META[case]
    p = write_meta_gguf(tmp_path / f"{case}.gguf", **override)
    with pytest.raises(ModelFileError) as e:
        ModelSpec.from_gguf(GGUFFile(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and key in msg and "re-convert" in msg, msg


def test_nan_eps_is_refused_at_load_not_turned_into_nan_logits(tmp_path):
    import engine
    p = write_meta_gguf(tmp_path / "nan.gguf", **{EPS: ("float32", math.nan)})
    with pytest.raises(ModelFileError, match="layer_norm_rms_epsilon"):
        engine.load(p, ctx=16)


# -- the CLI jobs, run side by side ---------------------------------------------------------------
def _doctor(run: Path, edit) -> None:
    """Rewrite records.jsonl through ``edit(record) -> record | None`` (None drops it)."""
    out = []
    for line in (run / RECORDS).read_text().splitlines():
        r = edit(json.loads(line))
        if r is not None:
            out.append(json.dumps(r))
    (run / RECORDS).write_text("\n".join(out) + "\n")


def _set_manifest(run: Path, **kv) -> None:
    m = json.loads((run / MANIFEST).read_text())
    m.update(kv)
    (run / MANIFEST).write_text(json.dumps(m))


def _head_with_unmeasured_gates(base: Path, head: Path) -> Path:
    """head = base, but: q8_0 argmax's max-abs gate skipped while the case still says pass (the
    old judge); bf16 coherence missing; q8_0 vram incomplete with its gate skipped; fp32
    coherence declared n/a (no metrics)."""
    shutil.copytree(base, head)

    def edit(r):
        k = (r["kv_dtype"], r["check"])
        if k == ("q8_0", "argmax") and r.get("metric") == "Max abs logit diff":
            return {**r, "value": None, "passed": None, "skipped": "reference logits not computed"}
        if k == ("bf16", "coherence"):
            return None
        if k == ("q8_0", "vram"):
            if r.get("metric") == "KV dtype mismatches":
                return {**r, "value": None, "passed": None, "skipped": "ledger unavailable"}
            if r["type"] == "case":
                return {**r, "status": "incomplete", "unmeasured": ["KV dtype mismatches not measured"]}
        if k == ("fp32", "coherence"):
            if r["type"] == "case":
                return {**r, "status": "n/a", "reason": "random weights: no language to judge"}
            return None
        return r
    _doctor(head, edit)
    return head


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every independent CLI case made on disk, then all runs at once (~2.5 s of imports each)."""
    t = tmp_path_factory.mktemp("hostile")
    jobs: dict[str, tuple] = {}      # id -> (argv, context for the asserts)

    # GGUF metadata through `engine plan` (metadata only: ModelSpec.from_gguf)
    for case in ("eps-nan", "eps-string"):
        override, key = BAD_META[case]
        p = write_meta_gguf(t / f"{case}.gguf", **override)
        jobs[f"gguf-{case}"] = (["engine", "plan", p], (p, key))

    # engine CLI counts
    for case, argv in {
        "bench-repeats-0": ["bench", "--model", "tiny-llama", "--repeats", "0"],
        "bench-prompt-tokens-0": ["bench", "--model", "tiny-llama", "--prompt-tokens", "0"],
        "generate-max-new-tokens-neg": ["generate", "tiny-llama", "hi", "--max-new-tokens", "-3"],
    }.items():
        jobs[case] = (["engine", *argv], argv[-2])        # the flag with the bad value
    jobs["bench-short-prompt"] = (["engine", "bench", "--model", "tiny-llama", "--prompt-tokens", "3",
                                   "--decode-tokens", "2", "--repeats", "1"], None)

    # harness run: the same --model twice; an --out that is a file
    occupied = t / "occupied"
    occupied.write_text("not a directory\n")
    jobs["run-duplicate-model"] = (["harness", "run", "suites/smoke.toml", "--model", "tiny-qwen3",
                                    "--model", "tiny-qwen3", "--out", t / "dup-out", "--no-progress"],
                                   t / "dup-out")
    jobs["run-out-is-file"] = (["harness", "run", "suites/smoke.toml", "--out", occupied,
                                "--no-progress"], occupied)

    # results readers
    good = make_run(t / "good")
    bad = {}
    for case in ("schema-99", "non-utf8"):
        bad[case] = spoil(make_run(t / f"bad-{case}"), case)
        jobs[f"read-{case}"] = (["harness", "compare", bad[case], good], bad[case])

    # merge: --out holding a run (refused / --force), --out a file
    for case in ("merge-refuse", "merge-force"):
        held = make_run(t / case / "out", models=("old",))
        jobs[case] = (["harness", "merge", good, "--out", held] + (["--force"] if case == "merge-force" else []),
                      (held, (held / RECORDS).read_bytes(), (held / MANIFEST).read_bytes()))
    jobs["merge-out-file"] = (["harness", "merge", good, "--out", occupied], occupied)

    # compare: unmeasured gates, statuses, suites; bad tolerance; --out a directory; /dev/full
    head = _head_with_unmeasured_gates(good, t / "head")
    jobs["compare-unmeasured"] = (["harness", "compare", good, head, "--out", t / "unmeasured.md"],
                                  t / "unmeasured.md")
    other = t / "other-suite"
    shutil.copytree(good, other)
    m = json.loads((other / MANIFEST).read_text())
    m["suite"].update(sha256="def", path="suites/other.toml")
    m["suite"]["suite"]["baseline"] = "bf16"
    _set_manifest(other, suite=m["suite"])
    jobs["compare-suite-change"] = (["harness", "compare", good, other], None)
    jobs["compare-suite-change-allowed"] = (["harness", "compare", good, other, "--allow-suite-change"], None)
    (t / "a-dir").mkdir()
    jobs["compare-out-dir"] = (["harness", "compare", good, good, "--out", t / "a-dir"], t / "a-dir")
    jobs["compare-out-dev-full"] = (["harness", "compare", good, good, "--out", "/dev/full"], None)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {k: pool.submit(run_cli, *argv) for k, (argv, _) in jobs.items()}
        return {k: (f.result(), jobs[k][1]) for k, f in futures.items()} | {"good": good}


@pytest.mark.slow(seconds=25)
@pytest.mark.parametrize("case", ["eps-nan", "eps-string"])
def test_cli_bad_metadata(runs, case):
    res, (path, key) = runs[f"gguf-{case}"]
    assert_user_error(res, str(path), key, "re-convert")


@pytest.mark.parametrize("case", ["bench-repeats-0", "bench-prompt-tokens-0", "generate-max-new-tokens-neg"])
def test_engine_cli_counts(runs, case):
    res, flag = runs[case]
    assert_user_error(res, f"argument {flag}", "--help")


@pytest.mark.parametrize("argv,needle", [
    (["generate", "m", "hi", "--ctx", "0"], "argument --ctx: must be >= 1, got 0"),
    (["bench", "--repeats", "three"], "argument --repeats: expected an integer >= 1, got 'three'"),
    (["bench", "--decode-tokens", "-1"], "argument --decode-tokens: must be >= 1"),
])
def test_engine_cli_counts_in_process(capsys, argv, needle):
    from engine import cli
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_bench_short_prompt_runs(runs):
    res, _ = runs["bench-short-prompt"]     # --prompt-tokens below the decode prefix (16) crashed
    assert res.returncode == 0, res.stderr[-2000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert "pp3_tok_s" in last and "tg2_tok_s" in last


def test_run_duplicate_model(runs):
    res, out = runs["run-duplicate-model"]
    assert_user_error(res, "--model tiny-qwen3", "more than once")
    assert not out.exists()


def test_run_out_is_a_file(runs):
    res, occupied = runs["run-out-is-file"]
    assert_user_error(res, str(occupied), "not a directory")
    assert occupied.read_text() == "not a directory\n"


READER_CASES = {
    "schema-99": [MANIFEST, "schema 99", "newer"],
    "manifest-list": [MANIFEST, "JSON object", "list"],
    "record-without-model": [f"{RECORDS}:5", "'model'"],
    "non-utf8": [f"{RECORDS}:7", "not UTF-8"],
    "record-list": [f"{RECORDS}:3", "JSON object"],
}


def spoil(run: Path, case: str) -> Path:
    """Break one thing of a results directory, as READER_CASES names it."""
    if case == "schema-99":
        _set_manifest(run, schema=99)
    elif case == "manifest-list":
        (run / MANIFEST).write_text("[1, 2, 3]\n")
    elif case == "non-utf8":
        raw = (run / RECORDS).read_bytes().split(b"\n")
        raw[6] = raw[6].replace(b'"hand"', b'"h\xff\xfend"', 1)
        (run / RECORDS).write_bytes(b"\n".join(raw))
    else:
        lines = (run / RECORDS).read_text().splitlines()
        if case == "record-without-model":
            r = json.loads(lines[4])
            del r["model"]
            lines[4] = json.dumps(r)
        else:
            lines[2] = "[1, 2]"
        (run / RECORDS).write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("case", ["schema-99", "non-utf8"])
def test_results_readers_validate(runs, case):
    res, d = runs[f"read-{case}"]
    assert_user_error(res, str(d), *READER_CASES[case])


@pytest.mark.parametrize("case", list(READER_CASES))
def test_results_readers_validate_in_process(tmp_path, case):
    run = spoil(make_run(tmp_path / "r"), case)
    with pytest.raises(ResultsError) as e:
        load_results(run)
    msg = str(e.value)
    assert "\n" not in msg and str(run) in msg and all(n in msg for n in READER_CASES[case]), msg


def test_merge_refuses_to_overwrite_a_run(runs):
    res, (held, records, manifest) = runs["merge-refuse"]
    assert_user_error(res, str(held), "already holds a run", "--force")
    assert (held / RECORDS).read_bytes() == records and (held / MANIFEST).read_bytes() == manifest


def test_merge_force_replaces_and_says_what(runs):
    res, (held, records, _) = runs["merge-force"]
    assert res.returncode == 0, res.stderr
    assert f"replaced the run in {held} (12 cases of suites/hand.toml" in res.stdout
    assert {c["model"] for c in load_results(held).cases()} == {"m1"}     # "old" is gone


def test_merge_out_is_a_file(runs):
    res, occupied = runs["merge-out-file"]
    assert_user_error(res, str(occupied), "is a file")
    assert occupied.read_text() == "not a directory\n"


def test_compare_counts_gates_not_measured_in_head(runs):
    res, md_path = runs["compare-unmeasured"]
    assert res.returncode == 1, res.stderr
    md = md_path.read_text()
    assert "0 regressions" not in md
    rows = [line for line in md.splitlines() if line.startswith("| m1 |")]

    def row(*cells):
        hits = [r for r in rows if all(f"| {c} |" in r for c in cells)]
        assert hits, (cells, md)
        return hits[0]
    # the case still says pass, but its gate was skipped: a regression, not "0 regressions"
    assert "not measured in head (reference logits not computed)" in row("q8_0", "argmax", "Max abs logit diff")
    assert "case not run in head" in row("bf16", "coherence", "(case)")
    assert "First token EOS" in row("bf16", "coherence", "(case)")          # the gate it held
    assert "incomplete" in row("q8_0", "vram", "(verdict)")
    assert "ledger unavailable" in row("q8_0", "vram", "KV dtype mismatches")
    assert "random weights" in row("fp32", "coherence", "(verdict)")        # pass -> n/a
    assert "| fp32 | coherence | pass | n/a |" in md                         # the per-case status table
    assert "| q8_0 | vram | pass | incomplete |" in md
    assert "1 incomplete" in md and "1 n/a" in md


def test_compare_states_suite_changes(runs):
    res, _ = runs["compare-suite-change"]
    assert res.returncode == 1 and "0 regressions" in res.stdout
    head = res.stdout.split("base `")[0]            # stated above the counts
    assert "different suites" in head and "suites/other.toml" in head and "suite.baseline: fp32 → bf16" in head
    allowed, _ = runs["compare-suite-change-allowed"]
    assert allowed.returncode == 0 and "allowed by --allow-suite-change" in allowed.stdout


def test_compare_suite_path_only_is_a_note(runs, tmp_path):
    from harness.compare import compare
    moved = tmp_path / "moved"
    shutil.copytree(runs["good"], moved)
    m = json.loads((moved / MANIFEST).read_text())
    m["suite"]["path"] = "/elsewhere/suites/hand.toml"
    _set_manifest(moved, suite=m["suite"])
    cmp = compare(runs["good"], moved)          # same bytes, another path: a note, exit 0
    md = cmp.markdown()
    assert cmp.exit_code == 0 and not cmp.suite_changes and "different suites" not in md
    assert "identical bytes" in md


def test_compare_bad_tolerance(capsys):
    from harness import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "a", "b", "--tolerance", "nan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--tolerance: must be a finite number" in err, err


def test_compare_out_is_a_directory(runs):
    res, d = runs["compare-out-dir"]
    assert_user_error(res, str(d), "EISDIR")
    assert d.is_dir() and not list(d.iterdir())


def test_compare_out_full_device(runs):
    res, _ = runs["compare-out-dev-full"]
    assert_user_error(res, "/dev/full", "ENOSPC")
    assert Path("/dev/full").is_char_device()


# -- a closed stdout ------------------------------------------------------------------------------
def test_broken_pipe_is_quiet(runs):
    """``compare A B | head -1``: the reader is gone before compare writes; compare stops
    quietly with 141 (128 + SIGPIPE), as a shell reports for any tool that SIGPIPE ends."""
    good = runs["good"]
    p = subprocess.Popen([PY, "-m", "harness", "compare", str(good), str(good)], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                        # before the child has imported anything
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err.decode()[-2000:]
    assert err == b""


# -- permissions and filesystems ------------------------------------------------------------------
def test_unwritable_out(runs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        cmd = [PY, "-m", "harness", "merge", str(runs["good"]), "--out", str(locked / "m")]
        if os.access(locked, os.W_OK):       # root writes anywhere unless the capability is gone
            prefix = _without_file_override()
            if prefix is None:
                pytest.skip("root without setpriv able to drop CAP_DAC_OVERRIDE: EACCES cannot be made")
            cmd = [*prefix, *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
        assert_user_error(res, str(locked / "m"), "EACCES")
        assert not (locked / "m").exists()
    finally:
        locked.chmod(0o755)


TINY_FS = """
mount -t tmpfs -o "$1" kvbench-test "$0" || exit 99
if [ "$2" = fill ]; then cat /dev/zero > "$0/filler" 2>/dev/null; fi
shift 2
"$@"; rc=$?
echo "LEFT: $(ls -A "$0/m" 2>/dev/null | tr '\\n' ' ')"
exit $rc
"""


def _namespace_prefix() -> list[str] | None:
    """argv prefix that runs a command in a private mount namespace where it may mount a tmpfs
    (root: ``unshare --mount``; others: with a user namespace), or None where neither works."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k kvbench-probe /mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def _in_tiny_fs(mnt: Path, argv: list[str], options: str, fill: bool) -> subprocess.CompletedProcess:
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no unshare, or no mount/user namespaces): "
                    "the /dev/full case still covers ENOSPC")
    mnt.mkdir()
    return subprocess.run([*prefix, "sh", "-c", TINY_FS, str(mnt), options, "fill" if fill else "-", *argv],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=180)


def test_full_filesystem_leaves_nothing_trusted(runs, tmp_path):
    """merge into a real filled-up 64 KiB tmpfs: exit 2 naming the file and ENOSPC, and the
    output directory holds no records, manifest or temp file (only the lock file)."""
    mnt = tmp_path / "full"
    res = _in_tiny_fs(mnt, [PY, "-m", "harness", "merge", str(runs["good"]), "--out", str(mnt / "m")],
                      "size=64k", fill=True)
    out, res.stdout = res.stdout, ""
    assert_user_error(res, str(mnt / "m"), "ENOSPC")
    assert out.strip().splitlines()[-1].split() == ["LEFT:", ".lock"], out


def test_full_filesystem_mid_run_keeps_whole_cases(tmp_path):
    """RecordWriter appends cases to a real tmpfs until it is full: the failing append is cut
    back, so the file holds only whole cases and ends with a newline."""
    mnt = tmp_path / "full"
    script = (
        "import sys\nfrom pathlib import Path\nfrom harness.results import RecordWriter, read_records\n"
        "d = Path(sys.argv[1]) / 'm'; d.mkdir(); w = RecordWriter(d)\n"
        "common = {'model': 'm', 'kv_dtype': 'fp32', 'type': 'metric', 'metric': 'x', 'value': 1.0}\n"
        "i = 0\n"
        "try:\n"
        "    while True:\n"
        "        recs = [{**common, 'check': f'c{i}', 'pad': 'x' * 3000}] * 3\n"
        "        w.write_case(recs + [{**common, 'check': f'c{i}', 'type': 'case', 'status': 'pass'}])\n"
        "        i += 1\n"
        "except OSError as e:\n"
        "    data = (d / 'records.jsonl').read_bytes()\n"
        "    print('ERRNO', e.errno, e.filename, i, len(read_records(d)), data.endswith(b'\\n'))\n")
    res = _in_tiny_fs(mnt, [PY, "-c", script, str(mnt)], "size=64k", fill=False)
    assert res.returncode == 0, res.stderr[-2000:]
    words = next(line for line in res.stdout.splitlines() if line.startswith("ERRNO")).split()
    import errno
    assert int(words[1]) == errno.ENOSPC and words[2] == str(mnt / "m" / RECORDS)
    cases, recs = int(words[3]), int(words[4])
    assert cases > 0 and recs == 4 * cases and words[5] == "True"


def test_read_only_filesystem(runs, tmp_path):
    mnt = tmp_path / "ro"
    res = _in_tiny_fs(mnt, [PY, "-m", "harness", "merge", str(runs["good"]), "--out", str(mnt / "m")],
                      "ro,size=64k", fill=False)
    res.stdout = ""
    assert_user_error(res, str(mnt / "m"), "EROFS")


# -- one writer per results directory -------------------------------------------------------------
HOLD = ("import sys\nfrom harness.results import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")


def test_run_lock_refuses_a_second_process(runs, tmp_path):
    d = tmp_path / "shared"
    holder = subprocess.Popen([PY, "-c", HOLD, str(d)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_cli("harness", "merge", runs["good"], "--out", d)
        assert_user_error(res, str(d), "in use by another kvbench process", f"pid {holder.pid}",
                          f"kill {holder.pid}")
        assert not (d / RECORDS).exists() and not (d / MANIFEST).exists()
        # the same in-process: a second RunLock is refused while the first process holds it
        with pytest.raises(ResultsError, match=f"pid {holder.pid}"):
            with RunLock(d):
                pass
    finally:
        holder.kill()                       # SIGKILL: the OS drops the lock with the process
        holder.wait(timeout=30)
    res = run_cli("harness", "merge", runs["good"], "--out", d)
    assert res.returncode == 0, res.stderr
    assert len(load_results(d).cases()) == 12


def test_run_refuses_a_locked_results_dir(tmp_path):
    """A run (here --resume, the case of the issue) on a directory another process holds is
    refused before it reads or rewrites anything, naming the holder."""
    d = make_run(tmp_path / "busy")
    before = (d / RECORDS).read_bytes()
    holder = subprocess.Popen([PY, "-c", HOLD, str(d)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_cli("harness", "run", "suites/smoke.toml", "--out", d, "--resume", "--no-progress")
        assert_user_error(res, str(d), f"pid {holder.pid}")
        assert (d / RECORDS).read_bytes() == before
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_run_lock_is_reentrant_after_release(tmp_path):
    with RunLock(tmp_path / "r") as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())
    with RunLock(tmp_path / "r"):
        pass


# -- readers, in-process ----------------------------------------------------------------------------
def test_reader_keeps_torn_tail_only_at_the_end(tmp_path):
    run = make_run(tmp_path / "r")
    full = read_records(run)
    data = (run / RECORDS).read_bytes()
    (run / RECORDS).write_bytes(data + b'{"type": "metric", "mo')       # torn: no newline
    assert read_records(run) == full
    (run / RECORDS).write_bytes(data + b'{"type": "metric", "mo\n')     # a whole line: corrupt
    with pytest.raises(ResultsError, match=rf"{RECORDS}:{len(full) + 1}: not a JSON record"):
        read_records(run)


@pytest.mark.parametrize("manifest,needle", [
    ({"run": "x"}, "no 'schema' key"),
    ({"schema": "1"}, "not a kvbench schema"),
    ({"schema": 1, "suite": "kv"}, "'suite' must be an object"),
    ({"schema": 1, "matrix": {"models": "m1"}}, "'matrix.models' must be a list of strings"),
])
def test_manifest_validation(tmp_path, manifest, needle):
    run = make_run(tmp_path / "r")
    (run / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ResultsError, match=needle):
        load_results(run)


@pytest.mark.parametrize("edit,needle", [
    (lambda r: {**r, "status": 3} if r["type"] == "case" else r, "'status' must be a string"),
    (lambda r: {**r, "failures": "oops"} if r["type"] == "case" else r, "'failures' must be a list"),
    (lambda r: {k: v for k, v in r.items() if k != "metric"} if r["type"] == "metric" else r,
     "metric record lacks the key 'metric'"),
    (lambda r: {**r, "values": 5} if r["type"] == "series" else r, "'values' must be a list"),
])
def test_record_validation(tmp_path, edit, needle):
    run = make_run(tmp_path / "r")
    _doctor(run, edit)
    with pytest.raises(ResultsError, match=needle):
        read_records(run)


def test_record_writer_appends_whole_cases(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    w = RecordWriter(d)
    common = {"model": "m", "kv_dtype": "fp32", "check": "c"}
    w.write_case([{**common, "type": "metric", "metric": "x", "value": 1.0},
                  {**common, "type": "case", "status": "pass"}])
    w.close()
    assert [r["type"] for r in read_records(d)] == ["metric", "case"]
