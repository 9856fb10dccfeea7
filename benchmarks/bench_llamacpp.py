"""llama.cpp side by side: build (or reuse) llama-bench from the llama.cpp vendored in the PyPI
sdist of llama-cpp-python, run it on the same GGUF kvbench runs, write JSON next to ours.

Contract: three steps, each usable alone.
- ``pack SDIST OUT.tar.gz``: the parts of the vendored llama.cpp that build llama-bench
  (ggml, src, include, common, tools without the web UI, vendor, cmake, app, pocs and the
  top-level CMake files: ~5 MB), so a machine without network can build it.
- ``build SRC BUILD_DIR [--target T]``: configure and build ``llama-bench`` only (or tool ``T``,
  e.g. ``llama-perplexity`` for ``benchmarks/kld_vs_llamacpp.py``), with CUDA for the GPU
  present (``-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=<its compute capability>``) or for the
  CPU, tests / examples / server / web UI / curl off; SRC is a directory or a tarball from
  ``pack``. A build directory that already holds llama-bench is reused.
- ``bench MODEL``: llama-bench ``-fa 1 -ngl 99 -o json`` for each KV type (``-ctk``/``-ctv``),
  decode ``tg`` at each depth (``-d``, same depths as kvbench's decode benchmarks) and prefill
  ``pp``, ``-r`` repetitions; optional ``--n-cpu-moe N`` (attention and KV of every layer on
  the GPU, the routed experts of N layers on the CPU). The JSON keeps llama-bench's own
  records (avg and stddev over repetitions, every sample) plus the command, build and device,
  and each run's peak GPU memory as nvidia-smi saw the process (``benchmarks/vram.py``).
  The last stdout line is one compact JSON document.

    python benchmarks/bench_llamacpp.py pack /tmp/llama_cpp_python-0.3.36.tar.gz .devcarry/llamacpp-src.tar.gz
    python benchmarks/bench_llamacpp.py build .devcarry/llamacpp-src.tar.gz /tmp/lcb
    python benchmarks/bench_llamacpp.py bench /tmp/kvcache/synth/coder30b-synth.gguf --bin /tmp/lcb/bin/llama-bench \
        --ctk f16,q8_0 --depths 0,16384 --out llamacpp.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vram import PeakVram  # noqa: E402

KEEP = ("ggml", "src", "include", "common", "tools", "vendor", "cmake", "app", "pocs", "licenses",
        "CMakeLists.txt", "CMakePresets.json", "LICENSE")
DROP = ("tools/ui", "tools/server/public", "ggml/src/ggml-vulkan", "ggml/src/ggml-sycl", "ggml/src/ggml-cann",
        "ggml/src/ggml-musa", "ggml/src/ggml-opencl", "ggml/src/ggml-metal", "ggml/src/ggml-webgpu",
        "ggml/src/ggml-hexagon", "ggml/src/ggml-zdnn")


def pack(sdist: Path, out: Path) -> Path:
    """Trimmed llama.cpp sources from the llama-cpp-python sdist (vendor/llama.cpp)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz", compresslevel=9) as dst:
        for m in src.getmembers():
            parts = m.name.split("/")
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rel = "/".join(parts[3:])
            if parts[3] not in KEEP or any(rel == d or rel.startswith(d + "/") for d in DROP):
                continue
            m.name = "llama.cpp/" + rel
            m.pax_headers = {k: v for k, v in m.pax_headers.items() if k not in ("path", "linkpath")}  # long names
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    return out


def _cuda_arch() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}{minor}"
    except ImportError:
        pass
    return None


def build(src: Path, build_dir: Path, jobs: int | None = None, target: str = "llama-bench") -> Path:
    """``target`` (llama-bench, or another llama.cpp tool such as llama-perplexity) from ``src``
    (directory or ``pack`` tarball) into ``build_dir``; returns the binary."""
    binary = build_dir / "bin" / target
    if binary.is_file():
        return binary
    if src.is_file():
        root = build_dir.parent / (build_dir.name + "-src")
        if not (root / "llama.cpp" / "CMakeLists.txt").is_file():
            root.mkdir(parents=True, exist_ok=True)
            with tarfile.open(src) as t:
                t.extractall(root)
        src = root / "llama.cpp"
    arch = _cuda_arch()
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_UI=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"]
    if arch:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CUDA_NCCL=OFF"]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.time()
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *gen, *flags], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", target, "-j", str(jobs or os.cpu_count())],
                   check=True)
    print(f"built {binary} in {time.time() - t0:.0f} s ({'CUDA sm_' + arch if arch else 'CPU'})", file=sys.stderr)
    return binary


def bench(binary: Path, model: Path, ctk: list[str], depths: list[int], reps: int, tg: int, pp: int,
          n_cpu_moe: int | None, threads: int | None) -> dict:
    """Run llama-bench once per KV type; returns {"runs": [...], ...} with llama-bench's JSON."""
    runs = []
    for kv in ctk:
        cmd = [str(binary), "-m", str(model), "-fa", "1", "-ngl", "99", "-ctk", kv, "-ctv", kv,
               "-n", str(tg), "-p", str(pp), "-d", ",".join(map(str, depths)), "-r", str(reps), "-o", "json"]
        if n_cpu_moe is not None:
            cmd += ["-ncmoe", str(n_cpu_moe)]
        if threads:
            cmd += ["-t", str(threads)]
        t0 = time.time()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with PeakVram(child.pid) as peak:        # what llama.cpp holds on the card: "equal VRAM"
            stdout, stderr = child.communicate()
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
        rec = {"kv": kv, "cmd": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
               **peak.result()}
        if proc.returncode == 0:
            try:
                rec["results"] = json.loads(proc.stdout)
            except json.JSONDecodeError:
                rec["error"] = "llama-bench printed no JSON"
                rec["stdout_tail"] = proc.stdout[-2000:]
        else:
            rec["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:500]
        runs.append(rec)
        for r in rec.get("results", []):
            kind = "tg" if r.get("n_gen") else "pp"
            n = r.get("n_gen") or r.get("n_prompt")
            print(f"{kv:5} {kind}{n} @ d{r.get('n_depth', 0)}: {r.get('avg_ts', 0):9.1f} +/- "
                  f"{r.get('stddev_ts', 0):6.1f} tok/s", file=sys.stderr)
        print(f"{kv:5} peak VRAM {rec['peak_vram_mib']} MiB" + (f" ({rec['why']})" if "why" in rec else ""),
              file=sys.stderr)
    return {"model": str(model), "binary": str(binary), "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("sdist", type=Path)
    p.add_argument("out", type=Path)
    b = sub.add_parser("build")
    b.add_argument("src", type=Path)
    b.add_argument("build_dir", type=Path)
    b.add_argument("-j", type=int, default=None)
    b.add_argument("--target", default="llama-bench", help="llama.cpp tool to build (e.g. llama-perplexity)")
    r = sub.add_parser("bench")
    r.add_argument("model", type=Path)
    r.add_argument("--bin", type=Path, required=True)
    r.add_argument("--ctk", default="f16,bf16,q8_0")
    r.add_argument("--depths", default="0,4096,16384")
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--tg", type=int, default=64)
    r.add_argument("--pp", type=int, default=0, help="prompt tokens timed (0: decode only)")
    r.add_argument("--n-cpu-moe", type=int, default=None)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        out = pack(args.sdist, args.out)
        print(json.dumps({"packed": str(out), "bytes": out.stat().st_size}))
        return 0
    if args.cmd == "build":
        print(json.dumps({"binary": str(build(args.src, args.build_dir, args.j, args.target))}))
        return 0
    for what, path, fix in (("llama-bench binary (--bin)", args.bin, "build it first (bench_llamacpp.py build "
                             "SRC BUILD_DIR) or pass its path"),
                            ("model", args.model, "pass a GGUF that exists (engine.models.resolve NAME)")):
        if not path.is_file():
            print(f"bench_llamacpp: {what} {path} does not exist: {fix}", file=sys.stderr)
            return 2
    if not os.access(args.bin, os.X_OK):
        print(f"bench_llamacpp: {args.bin} is not executable (chmod +x it)", file=sys.stderr)
        return 2
    doc = bench(args.bin, args.model, args.ctk.split(","), [int(x) for x in args.depths.split(",")], args.reps,
                args.tg, args.pp, args.n_cpu_moe, args.threads)
    doc["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        doc["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        doc["device"] = "cpu"
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({"ok": all(r["rc"] == 0 for r in doc["runs"]), "runs": len(doc["runs"])}))
    return 0 if all(r["rc"] == 0 for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
