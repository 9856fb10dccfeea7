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
