"""Bad input through the real CLIs: exit code 2, one ``error: `` line on stderr, no traceback.

Each case of issue 7 lists 2 (GGUF files) and 3 (suite files) runs ``python -m engine`` or
``python -m harness`` in a subprocess on a file made in tmp_path (gguf.GGUFWriter + byte
surgery) and checks the message names the file and the problem.

    .venv/bin/pytest -q tests/test_cli_errors.py
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "token_embd.weight": (32, 8), "output_norm.weight": (8,),
    "blk.0.attn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8),
    "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
    "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,),
    "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
    "blk.0.ffn_down.weight": (8, 16),
}


def write_gguf(path, arch="llama", drop=(), n_head=2, shapes=None, raw=None):
    """A tiny llama (1 layer, d=8); ``shapes`` overrides tensor shapes, ``raw`` maps a
    tensor name to (bytes array, qtype) written as-is."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(n_head)
    w.add_head_count_kv(1)
    w.add_feed_forward_length(16)
    w.add_context_length(64)
    rng = np.random.default_rng(0)
    for name, shape in {**SHAPES, **(shapes or {})}.items():
        if name in drop:
            continue
        if raw and name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- GGUF input (list 2) -----------------------------------------------------------------------
def _cut(tmp_path, keep) -> Path:
    full = write_gguf(tmp_path / "full.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[:keep(full)])
    return p


def _wrong_version(tmp_path) -> Path:
    data = bytearray(write_gguf(tmp_path / "v.gguf").read_bytes())
    data[4:8] = struct.pack("<I", 99)
    p = tmp_path / "v99.gguf"
    p.write_bytes(bytes(data))
    return p


def _not_gguf(tmp_path) -> Path:
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip archive, not a model" * 8)
    return p


def _zero(tmp_path) -> Path:
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    return p


def _directory(tmp_path) -> Path:
    d = tmp_path / "model_dir.gguf"
    d.mkdir()
    return d


def _unsupported_type(tmp_path) -> Path:
    # F64: a real ggml type the engine does not load (the d=8 rows are too short for any
    # block-quantized type, whose blocks hold >= 32 values)
    data = np.random.default_rng(1).standard_normal((16, 8))  # float64
    return write_gguf(tmp_path / "f64.gguf", raw={"blk.0.ffn_gate.weight": (data, gguf.GGMLQuantizationType.F64)})


GGUF_CASES = {
    # id: (make file, command, words the one line must hold)
    "not-gguf": (_not_gguf, "plan", ["not a GGUF file"]),
    "truncated-header": (lambda t: _cut(t, lambda d: 40), "plan", ["truncated"]),
    "truncated-tensor-data": (lambda t: _cut(t, lambda d: len(d) - 10), "generate", ["truncated tensor data"]),
    "wrong-version": (_wrong_version, "plan", ["version 99"]),
    "unknown-architecture": (lambda t: write_gguf(t / "m.gguf", arch="mamba9"), "plan", ["mamba9"]),
    "unsupported-tensor-type": (_unsupported_type, "generate", ["F64", "unsupported", "blk.0.ffn_gate.weight"]),
    "missing-tensor": (lambda t: write_gguf(t / "m.gguf", drop=("blk.0.ffn_up.weight",)), "generate",
                       ["blk.0.ffn_up.weight", "missing"]),
    "misshaped-tensor": (lambda t: write_gguf(t / "m.gguf", shapes={"blk.0.attn_output.weight": (8, 7)}),
                         "generate", ["blk.0.attn_output.weight", "shape"]),
    "metadata-contradicts-shapes": (lambda t: write_gguf(t / "m.gguf", n_head=4), "generate", ["contradicts"]),
    "zero-length": (_zero, "plan", ["empty"]),
    "directory": (_directory, "generate", ["directory"]),
}


@pytest.mark.slow(seconds=3)
@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_input_errors(cli_runs, case):
    path, res = cli_runs[("gguf", case)]
    assert_user_error(res, str(path), *GGUF_CASES[case][2])


def _without_file_override() -> list[str] | None:
    """argv prefix that runs a command without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so root
    is held to file permissions like any user (None: no setpriv, or it may not drop them)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_gguf_no_read_permission(tmp_path):
    p = write_gguf(tmp_path / "locked.gguf")
    p.chmod(0)
    try:
        cmd = [sys.executable, "-m", "engine", "plan", str(p)]
        if os.access(p, os.R_OK):          # root reads anything unless the capability is gone
            prefix = _without_file_override()
            if prefix is None:
                pytest.skip("running as root without setpriv able to drop CAP_DAC_OVERRIDE: the "
                            "unreadable-file path cannot be exercised here")
            probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(p)!r}, 'rb')"],
                                   capture_output=True, text=True)
            assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
            cmd = [*prefix, *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert_user_error(res, str(p), "no read permission")
    finally:
        p.chmod(0o644)


# -- Suite input (list 3) ----------------------------------------------------------------------
GOOD_SUITE = """\
[suite]
name = "t"
models = ["tiny-qwen3"]
baseline = "fp32"
kv_dtypes = ["bf16"]
device = "cpu"
ctx = 256
seed = 0

[[check]]
kind = "argmax"
positions = 8
top_k = 5
messages = [[{ role = "user", content = "Hi." }]]
"""

SUITE_CASES = {
    # id: (replace old -> new in GOOD_SUITE, words the one line must hold)
    "toml-syntax-error": (("[suite]\nname", "[suite\nname"), ["TOML syntax error", "line 1"]),
    "unknown-key": (("seed = 0", "seed = 0\ncolour = 'red'"), ["suite.colour", "unknown key"]),
    "wrong-type": (("ctx = 256", "ctx = \"big\""), ["suite.ctx", "expected"]),
    "unknown-check": (('kind = "argmax"', 'kind = "argmux"'), ["check[0].kind", "argmux"]),
    "unknown-model": (('models = ["tiny-qwen3"]', 'models = ["gpt-17"]'), ["gpt-17", "unknown model"]),
    "negative-threshold": (("top_k = 5", "top_k = 5\nmax_mean_kld = -0.5"), ["check[0].max_mean_kld"]),
    "top-k-zero": (("top_k = 5", "top_k = 0"), ["check[0].top_k"]),
    "empty-matrix": (('kv_dtypes = ["bf16"]', "kv_dtypes = []"), ["empty matrix"]),
}


def test_good_suite_template_is_valid():
    # the cases below break one thing each in a suite that is otherwise accepted
    from harness.suite import parse_suite
    import tomllib
    suite = parse_suite(tomllib.loads(GOOD_SUITE))
    assert suite.checks[0].top_k == 5


def test_the_harness_cli_and_suite_checks_load_without_torch(tmp_path):
    """A bad suite, `harness compare` / `report` / `merge`: the harness's command line, its
    check registry and the suite parser import no torch (~3 s of the 4 a command took), so
    such a command answers in about a second; torch loads where a check measures."""
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD_SUITE.replace("[suite]\nname", "[suite\nname", 1))
    probe = ("import sys; sys.argv = ['harness', 'run', sys.argv[1], '--out', sys.argv[2]]\n"
             "import harness.cli, harness.suite, harness.compare, harness.report\n"
             "assert 'torch' not in sys.modules, 'torch imported by the harness CLI'\n"
             "code = harness.cli.main(sys.argv[1:])\n"
             "print('torch' in sys.modules, code)")
    res = subprocess.run([sys.executable, "-c", probe, str(bad), str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "2"] and "TOML syntax error" in res.stderr


def test_the_engine_cli_parses_its_flags_without_torch(tmp_path):
    """`python -m engine --help`, a bad flag of any command and `plan` of a file that is no
    GGUF answer before torch (and the planner's kernels) load."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"XXXX" + bytes(60))
    probe = ("import sys, contextlib, io\n"
             "import engine.cli\n"
             "for argv in (['--help'], ['bench', '--repeats', '0'], ['plan', 'tiny-llama', '--ctx', 'x'], ['plan', sys.argv[1]]):\n"
             "    err, code = io.StringIO(), None\n"
             "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
             "        try:\n"
             "            code = engine.cli.main(argv)\n"
             "        except SystemExit as e:\n"
             "            code = e.code\n"
             "    print(argv[0], code, 'torch' in sys.modules, err.getvalue().count('\\n'))\n")
    res = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == ["--help 0 False 0", "bench 2 False 1", "plan 2 False 1", "plan 2 False 1"], res.stdout


@pytest.mark.parametrize("case", list(SUITE_CASES))
def test_suite_input_errors(cli_runs, case):
    path, res = cli_runs[("suite", case)]
    assert_user_error(res, str(path), *SUITE_CASES[case][1])
    assert not list((path.parent / "out").glob("**/*.jsonl"))  # nothing ran


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """Every bad-input case made on disk, then all CLI runs at once (each is ~1.5 s of
    interpreter start-up; running them side by side keeps this file's wall time down)."""
    jobs = {}
    for case, (make, command, _) in GGUF_CASES.items():
        path = make(tmp_path_factory.mktemp(f"gguf-{case}"))
        extra = ["hi", "--max-new-tokens", "1"] if command == "generate" else []
        jobs[("gguf", case)] = (path, ["engine", command, path, *extra])
    for case, ((old, new), _) in SUITE_CASES.items():
        assert old in GOOD_SUITE
        path = tmp_path_factory.mktemp(f"suite-{case}") / "suite.toml"
        path.write_text(GOOD_SUITE.replace(old, new, 1))
        jobs[("suite", case)] = (path, ["harness", "run", path, "--out", path.parent / "out"])
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {key: pool.submit(run_cli, *args) for key, (_, args) in jobs.items()}
        return {key: (jobs[key][0], f.result()) for key, f in futures.items()}


# -- Unexpected exceptions (a bug, not bad input) ------------------------------------------------
def _saved_traceback(line: str) -> Path:
    m = re.search(r"(/\S+kvbench-traceback-\S+\.txt)", line)
    assert m, line
    return Path(m.group(1))


def test_engine_cli_bug_is_one_line_and_a_saved_traceback(monkeypatch, capsys):
    import engine
    from engine import cli

    def broken(*args, **kwargs):
        raise ZeroDivisionError("injected bug")

    monkeypatch.setattr(engine, "load", broken)
    assert cli.main(["generate", "tiny-qwen3", "hi"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ZeroDivisionError" in err[0] and "Traceback" not in err[0]
    saved = _saved_traceback(err[0])
    try:
        text = saved.read_text()
        assert text.startswith("Traceback") and "injected bug" in text and "def broken" not in err[0]
    finally:
        saved.unlink()


def test_harness_cli_bug_is_one_line_and_a_saved_traceback(monkeypatch, capsys, tmp_path):
    from harness import cli, runner

    def broken(args):
        raise KeyError("injected bug")

    monkeypatch.setattr(runner, "main", broken)
    assert cli.main(["run", "suites/smoke.toml", "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KeyError" in err[0] and "Traceback" not in err[0]
    saved = _saved_traceback(err[0])
    try:
        assert "injected bug" in saved.read_text()
    finally:
        saved.unlink()


@pytest.mark.parametrize("argv,needle", [
    (["--vram-budget", "12 parsecs"], "--vram-budget: cannot read '12 parsecs'"),
    (["--cpu-moe", "2"], "pass expert_format='blocks' (--expert-format blocks)"),
    (["--cpu-moe", "many"], "argument --cpu-moe: expected auto or an integer >= 0"),
    (["--expert-format", "blocks", "--cpu-moe", "9"], "cpu_moe 9 must be 'auto' or an integer in [0, 6]"),
    (["--host-experts", "pcie"], "host_experts 'pcie' places the experts of cpu_moe layers"),
    (["--host-experts", "gpu"], "argument --host-experts: invalid choice: 'gpu'"),
])
def test_engine_cli_expert_placement_errors(capsys, argv, needle):
    """The hybrid's flags: bad input is one line, exit 2, before any weights are read."""
    from engine import cli
    try:
        rc = cli.main(["generate", "coder30b-mini-synth", "hi", "--ctx", "64", *argv])
    except SystemExit as exc:                  # argparse's own refusal (engine.cli.Parser: one line)
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
