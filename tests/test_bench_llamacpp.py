"""benchmarks/bench_llamacpp.py without a GPU: bad paths give one line and exit 2 (no traceback),
and ``pack`` keeps what builds llama-bench and drops the rest of the sdist."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_llamacpp.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_bench_missing_binary_or_model_is_one_line_exit_2(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    for args, needle in ((["bench", str(model), "--bin", str(tmp_path / "nope")], "llama-bench binary"),
                         (["bench", str(tmp_path / "none.gguf"), "--bin", sys.executable], "model"),
                         (["bench", str(model), "--bin", str(model)], "not executable")):
        p = _run(*args)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert needle in p.stderr


def test_pack_keeps_build_sources_and_drops_the_rest(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    files = {"llama_cpp_python-0.0.0/vendor/llama.cpp/ggml/src/ggml.c": b"int x;",
             "llama_cpp_python-0.0.0/vendor/llama.cpp/CMakeLists.txt": b"project(x)",
             "llama_cpp_python-0.0.0/vendor/llama.cpp/tools/llama-bench/llama-bench.cpp": b"int main(){}",
             "llama_cpp_python-0.0.0/vendor/llama.cpp/tools/ui/index.html": b"<html>",
             "llama_cpp_python-0.0.0/vendor/llama.cpp/ggml/src/ggml-metal/m.m": b"metal",
             "llama_cpp_python-0.0.0/vendor/llama.cpp/docs/readme.md": b"docs",
             "llama_cpp_python-0.0.0/llama_cpp/llama.py": b"python"}
    with tarfile.open(sdist, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = tmp_path / "src.tar.gz"
    p = _run("pack", str(sdist), str(out))
    assert p.returncode == 0, p.stderr
    with tarfile.open(out) as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
        assert t.extractfile("llama.cpp/ggml/src/ggml.c").read() == b"int x;"
    assert names == {"llama.cpp/ggml/src/ggml.c", "llama.cpp/CMakeLists.txt",
                     "llama.cpp/tools/llama-bench/llama-bench.cpp"}


def _fake(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def test_bench_records_each_runs_peak_vram_or_why_not(tmp_path, monkeypatch):
    """Each llama-bench run carries the process's peak GPU memory as nvidia-smi reports it (a
    stand-in nvidia-smi here: this machine has none), or why there is none."""
    import json
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    fake_bench = _fake(tmp_path / "llama-bench", "import json, time\ntime.sleep(0.6)\n"
                       "print(json.dumps([{'n_gen': 8, 'n_prompt': 0, 'n_depth': 0, 'avg_ts': 100.0, 'stddev_ts': 1.0}]))\n")
    out = tmp_path / "lc.json"
    p = _run("bench", str(model), "--bin", str(fake_bench), "--ctk", "f16", "--depths", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["peak_vram_mib"] is None and run["why"] == "nvidia-smi not found"
    # with an nvidia-smi that lists every process at 4321 MiB (and another pid at 7): the peak is read
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake(bindir / "nvidia-smi", "import os, sys\n"
          "if any(a.startswith('--query-compute-apps') for a in sys.argv):\n"
          "    print('7, 99999')\n"
          "    for pid in os.popen('ps -e -o pid=').read().split(): print(f'{pid}, 4321')\n"
          "else: print('Fake GPU, 1 MiB')\n")
    env_path = f"{bindir}:{__import__('os').environ['PATH']}"
    p = subprocess.run([sys.executable, str(SCRIPT), "bench", str(model), "--bin", str(fake_bench), "--ctk", "f16",
                        "--depths", "0", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "PATH": env_path})
    assert p.returncode == 0, p.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["peak_vram_mib"] == 4321 and run["samples"] >= 1
