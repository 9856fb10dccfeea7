"""Storage error vs kernel error, validated against llama.cpp's own ``llama-perplexity --kl-divergence``.

Contract: on one model, one text and llama-perplexity's own chunking (``-c N``: chunks of N
tokens, the first replaced by BOS when the vocabulary adds one, positions N/2 .. N-2 scored,
each predicting the next token), for each narrowed KV type T:

- ``llama-perplexity`` (a CPU build from the llama.cpp vendored in the PyPI sdist of
  llama-cpp-python: ``bench_llamacpp.py build SRC DIR --target llama-perplexity``) writes the
  f32-KV base (``-ctk f32 -ctv f32 -fa on --kl-divergence-base``; the file also holds the
  tokens it evaluated), then scores ``-ctk T -ctv T -fa on --kl-divergence``: its printed
  ``Mean KLD`` +/- and ``Same top p`` are kept as printed;
- llama.cpp in-process (``harness.adapters.llamacpp``, llama-cpp-python built by
  ``make llama-cpp`` from the same sdist) on exactly those tokens, f32 KV and T KV: per-position
  KLD, so differences with kvbench can be paired position by position;
- kvbench's engine on the same tokens: fp32 KV with exact maths as the base, then T KV with
  ``attn_math = exact`` (storage error alone) and ``ggml-cpu`` (the query converted to K's dot
  type, as llama.cpp's CPU kernels do: storage + kernel maths).

llama.cpp runs with ``LLAMA_ATTN_ROT_DISABLE=1`` (plain KV types, like kvbench's): its default
for a quantized KV type (head size % 64 == 0) multiplies Q, K and V by a Walsh-Hadamard matrix
before storing, a different format, reported in its own column (``llamacpp_rot``).

The verdict per T (issue 15 item 8): kvbench ``ggml-cpu`` Mean KLD within 20% of llama.cpp's
and within 3 standard errors of the paired per-position difference. The report attributes T's
KLD to storage (``exact``) and maths (``ggml-cpu`` minus ``exact``). Writes ``kld.json``,
``README.md`` and ``kld.png`` into ``--out``; exit 0 when every T holds the bar, 1 otherwise.

    python benchmarks/bench_llamacpp.py build .devcarry/llamacpp-src.tar.gz /tmp/lcp/build --target llama-perplexity
    python benchmarks/kld_vs_llamacpp.py --perplexity /tmp/lcp/build/bin/llama-perplexity \
        --model smollm2-135m --ctx 512 --chunks 16 --kv bf16,q8_0 --out reports/cpu-2026-12-03/kld-vs-llamacpp
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from engine.gguf_io import open_gguf  # noqa: E402
from engine.models import resolve  # noqa: E402
from harness import corpus as corpora  # noqa: E402
from harness.stats import mean_se  # noqa: E402

MODES = ("exact", "ggml-cpu")
_MEAN_KLD = re.compile(r"Mean\s+KLD:\s*([-0-9.eE+]+)\s*±\s*([-0-9.eE+]+)")
_SAME_TOP = re.compile(r"Same top p:\s*([-0-9.eE+]+)\s*±\s*([-0-9.eE+]+)\s*%")


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.to(torch.float64), dim=-1)


def kld_rows(base_logits: torch.Tensor, test_logits: torch.Tensor) -> np.ndarray:
    """Per-row KL(base || test) in nats, float64."""
    lp, lq = log_softmax(base_logits), log_softmax(test_logits)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


def write_f32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every tensor dequantized to F32 (metadata copied as gguf's reader types it):
    llama.cpp then multiplies in float32 (for a quantized or f16 weight it first converts each
    activation row to the weight's dot type, q8_1 / q8_0 / f16, which turns any perturbation,
    a KV dtype's included, into that requantization's noise: see the report)."""
    if dst.is_file():
        return dst
    import gguf
    from gguf.quants import dequantize
    r = gguf.GGUFReader(src, "r")
    w = gguf.GGUFWriter(str(dst) + ".part", r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key == "general.file_type":
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w.add_tensor(t.name, dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(dst) + ".part", dst)
    return dst


def read_base_tokens(path: Path) -> tuple[int, int, int, np.ndarray]:
    """n_ctx, n_vocab, n_chunk and the evaluated tokens from a llama-perplexity base file."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"_logits_":
            raise SystemExit(f"error: {path} is not a llama-perplexity --kl-divergence-base file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", fh.read(12))
        toks = np.frombuffer(fh.read(4 * n_ctx * n_chunk), dtype=np.int32)
    return n_ctx, n_vocab, n_chunk, toks


ROT_ENV = "LLAMA_ATTN_ROT_DISABLE"     # llama.cpp: 1 = no Hadamard rotation of Q/K/V for quantized KV


def run_perplexity(binary: Path, model: Path, text: Path, ctx: int, chunks: int, kv: str, base: Path,
                   threads: int, score: bool, rot: bool = False) -> dict:
    # the f32 base without flash attention: llama.cpp's flash attention casts an f32 K/V to f16
    # (measured here: its "f32" and f16 KV logits are bit-identical), so only -fa off is f32 maths
    fa = "on" if score else "off"
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
           "-ctk", kv, "-ctv", kv, "-fa", fa, "-t", str(threads), "--kl-divergence-base", str(base)]
    if score:
        cmd.append("--kl-divergence")
    t0 = time.perf_counter()
    env = {**os.environ, ROT_ENV: "0" if rot else "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = {"cmd": f"{ROT_ENV}={env[ROT_ENV]} " + " ".join(cmd), "rc": p.returncode,
           "seconds": round(time.perf_counter() - t0, 1)}
    log = p.stdout + p.stderr
    if p.returncode != 0:
        out["log_tail"] = log[-3000:]
        return out
    if score:
        m, s = _MEAN_KLD.search(log), _SAME_TOP.search(log)
        out["mean_kld"], out["mean_kld_se"] = (float(m.group(1)), float(m.group(2))) if m else (None, None)
        out["same_top_p_pct"], out["same_top_p_se_pct"] = (float(s.group(1)), float(s.group(2))) if s else (None, None)
        out["kld_block"] = log[log.find("====== KL divergence"):][:1500] if "KL divergence" in log else log[-1500:]
    return out


def chunk_tokens(toks: np.ndarray, n_ctx: int, n_chunk: int, bos: int | None) -> list[list[int]]:
    out = []
    for c in range(n_chunk):
        ids = toks[c * n_ctx:(c + 1) * n_ctx].tolist()
        if bos is not None:
            ids[0] = bos
        out.append(ids)
    return out


def scored(logits: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """llama-perplexity's scored rows: positions n_ctx/2 .. n_ctx-2 (each predicts the next token)."""
    return logits[n_ctx // 2:n_ctx - 1]


def kvbench_logits(model: str, kv: str, mode: str, chunks: list[list[int]], n_ctx: int) -> list[torch.Tensor]:
    eng = engine.load(model, kv_dtype=kv, ctx=n_ctx, device="cpu", weight_format="f32")
    try:
        eng.set_attn_math(mode)
        return [scored(eng.logits(ids), n_ctx) for ids in chunks]
    finally:
        eng.close()


def llamacpp_logits(model: str, kv: str, chunks: list[list[int]], n_ctx: int, threads: int,
                    rot: bool = False) -> list[torch.Tensor]:
    """llama.cpp's logits; ``rot``: its Hadamard rotation of Q/K/V for a quantized KV type on (its
    default since it was added) or off (``LLAMA_ATTN_ROT_DISABLE=1``: plain q8_0, like kvbench's)."""
    from harness.adapters.llamacpp import LlamaCpp
    os.environ[ROT_ENV] = "0" if rot else "1"        # read by llama.cpp when the context is made
    eng = LlamaCpp(model, kv, kv, {"ctx": n_ctx}, threads=threads, flash_attn=kv != "f32")
    try:
        applied = eng.kv_applied_native
        if set(applied) != {kv}:
            raise SystemExit(f"error: llama.cpp applied {sorted(set(applied))} KV, {kv} was asked")
        return [scored(eng.logits(ids), n_ctx) for ids in chunks]
    finally:
        eng.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perplexity", type=Path, required=True, help="llama-perplexity binary")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default=None, help="harness corpus (default: the registry default)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--kv", default="bf16,q8_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--weights", choices=("f32", "file"), default="f32",
                    help="f32: run every engine on an F32 copy of the model (default; see write_f32_copy); "
                         "file: the GGUF as it is")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.perplexity.is_file():
        print(f"error: {args.perplexity} does not exist; build it: python benchmarks/bench_llamacpp.py build "
              f".devcarry/llamacpp-src.tar.gz /tmp/lcp/build --target llama-perplexity", file=sys.stderr)
        return 2
    kvs = args.kv.split(",")
    out = args.out
    work = out / "work"                          # base logits file and the text: not committed
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = Path(resolve(args.model))
    display = args.model if args.weights == "file" else f"{args.model} (F32 copy of {gguf_path.name})"
    if args.weights == "f32":
        gguf_path = write_f32_copy(gguf_path, work / (gguf_path.stem + ".F32.gguf"))
        args.model = str(gguf_path)
    text = corpora.load(args.corpus)
    (work / "text.txt").write_text(text.text)
    doc: dict = {"model": display, "gguf": gguf_path.name, "weights": args.weights, "corpus": text.manifest, "ctx": args.ctx,
                 "chunks": args.chunks, "threads": args.threads, "machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "kv": {}}
    base = work / "base.kld"
    print(f"llama-perplexity: f32 KV base over {args.chunks} chunks of {args.ctx}", file=sys.stderr)
    doc["perplexity_base"] = run_perplexity(args.perplexity, gguf_path, work / "text.txt", args.ctx, args.chunks,
                                            "f32", base, args.threads, score=False)
    if doc["perplexity_base"]["rc"] != 0:
        print(doc["perplexity_base"].get("log_tail", ""), file=sys.stderr)
        return 1
    n_ctx, n_vocab, n_chunk, toks = read_base_tokens(base)
    meta = open_gguf(gguf_path).meta
    bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token", True) else None
    chunks = chunk_tokens(toks, n_ctx, n_chunk, bos)
    doc.update(n_ctx=n_ctx, n_vocab=n_vocab, n_chunk=n_chunk, positions=n_chunk * (n_ctx - 1 - n_ctx // 2), bos=bos)
    print("kvbench fp32 KV base; llama.cpp f32 KV base (in-process)", file=sys.stderr)
    ref_ours = kvbench_logits(args.model, "fp32", "exact", chunks, n_ctx)
    ref_lc = llamacpp_logits(args.model, "f32", chunks, n_ctx, args.threads)
    ok_all = True
    for kv in kvs:
        row: dict = {}
        print(f"[{kv}] llama-perplexity --kl-divergence", file=sys.stderr)
        row["llama_perplexity"] = run_perplexity(args.perplexity, gguf_path, work / "text.txt", args.ctx,
                                                 args.chunks, kv, base, args.threads, score=True)
        print(f"[{kv}] llama.cpp in-process", file=sys.stderr)
        lc = llamacpp_logits(args.model, kv, chunks, n_ctx, args.threads)
        k_lc = np.concatenate([kld_rows(a, b) for a, b in zip(ref_lc, lc)])
        row["llamacpp"] = dict(zip(("mean_kld", "se"), mean_se(k_lc)))
        # llama.cpp's default for a quantized KV type: Q, K (and V, un-rotated after) multiplied by a
        # Walsh-Hadamard matrix before storing (head size % 64 == 0): another format, shown apart
        print(f"[{kv}] llama.cpp in-process, Hadamard rotation on (its default)", file=sys.stderr)
        lc_rot = llamacpp_logits(args.model, kv, chunks, n_ctx, args.threads, rot=True)
        row["llamacpp_rot"] = dict(zip(("mean_kld", "se"), mean_se(
            np.concatenate([kld_rows(a, b) for a, b in zip(ref_lc, lc_rot)]))))
        row["llama_perplexity_rot"] = run_perplexity(args.perplexity, gguf_path, work / "text.txt", args.ctx,
                                                     args.chunks, kv, base, args.threads, score=True, rot=True)
        per_mode = {}
        for mode in MODES:
            print(f"[{kv}] kvbench attn_math={mode}", file=sys.stderr)
            ours = kvbench_logits(args.model, kv, mode, chunks, n_ctx)
            k = np.concatenate([kld_rows(a, b) for a, b in zip(ref_ours, ours)])
            d = k - k_lc
            per_mode[mode] = k
            m, se = mean_se(k)
            dm, dse = mean_se(d)
            row[f"kvbench_{mode}"] = {"mean_kld": m, "se": se, "ratio_to_llamacpp": m / row["llamacpp"]["mean_kld"],
                                      "paired_diff": dm, "paired_diff_se": dse}
        g_ = row["kvbench_ggml-cpu"]
        within_20 = abs(g_["ratio_to_llamacpp"] - 1) <= 0.20
        within_3se = abs(g_["paired_diff"]) <= 3 * g_["paired_diff_se"]
        row["verdict"] = {"within_20pct": within_20, "within_3se": within_3se, "pass": within_20 and within_3se}
        ex = row["kvbench_exact"]["mean_kld"]
        row["attribution"] = {"storage": ex, "kernel_maths": g_["mean_kld"] - ex,
                              "kernel_share_pct": 100 * (g_["mean_kld"] - ex) / g_["mean_kld"] if g_["mean_kld"] else None}
        ok_all &= row["verdict"]["pass"]
        doc["kv"][kv] = row
        print(json.dumps({kv: row["verdict"], "ours": g_["mean_kld"], "llama.cpp": row["llamacpp"]["mean_kld"]}),
              file=sys.stderr)
    doc["pass"] = ok_all
    (out / "kld.json").write_text(json.dumps(doc, indent=1))
    write_report(doc, out, " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))
    print(json.dumps({"pass": ok_all, "out": str(out)}))
    return 0 if ok_all else 1


def _rot_cell(r: dict) -> str:
    a, b = r.get("llamacpp_rot"), r.get("llama_perplexity_rot") or {}
    if not a:
        return "—"
    pb = f"{b['mean_kld']:.3e} ± {b['mean_kld_se']:.1e}" if b.get("mean_kld") is not None else "—"
    return f"{a['mean_kld']:.3e} ± {a['se']:.1e} / {pb}"


def write_report(doc: dict, out: Path, command: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kvs = list(doc["kv"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w = 0.2
    series = [("kvbench exact (storage)", "kvbench_exact"), ("kvbench ggml-cpu (storage+maths)", "kvbench_ggml-cpu"),
              ("llama.cpp in-process", "llamacpp"), ("llama.cpp default (Hadamard-rotated)", "llamacpp_rot")]
    w = 0.18
    for j, (label, key) in enumerate(series):
        ms = [doc["kv"][k][key]["mean_kld"] for k in kvs]
        ses = [doc["kv"][k][key]["se"] for k in kvs]
        ax.bar(np.arange(len(kvs)) + (j - 1.5) * w, ms, w, yerr=ses, capsize=3, label=label)
    lp = [doc["kv"][k]["llama_perplexity"].get("mean_kld") for k in kvs]
    ax.scatter(np.arange(len(kvs)) + 2.3 * w, lp, marker="D", color="k", zorder=3, label="llama-perplexity (printed)")
    ax.set_xticks(np.arange(len(kvs)), [f"{k} KV" for k in kvs])
    ax.set_yscale("log")
    ax.set_ylabel("Mean KLD vs f32 KV (nats)")
    ax.set_title(f"{doc['model']}: KV storage vs kernel maths, {doc['positions']} positions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kld.png", dpi=120)
    plt.close(fig)
    lines = [f"# KV storage error vs kernel error: kvbench against llama.cpp ({doc['model']})", "",
             f"Command: `{command}`", "",
             f"Machine: {doc['cpus']}-core CPU box ({doc['machine']}), {doc['when']}; model `{doc['gguf']}`, "
             f"text `{doc['corpus'].get('name')}` (sha256 `{str(doc['corpus'].get('sha256'))[:16]}…`), "
             f"{doc['n_chunk']} chunks of {doc['n_ctx']} tokens as llama-perplexity chunks them "
             f"(BOS first, positions {doc['n_ctx'] // 2}..{doc['n_ctx'] - 2} scored): {doc['positions']} positions.", "",
             "Base of every KLD: the same engine with f32 KV. kvbench `exact`: float32 maths on the stored "
             "values (the storage error alone); kvbench `ggml-cpu`: the query converted to the K type's "
             "dot type first, as llama.cpp's CPU flash attention does (storage + kernel maths).", "",
             "llama.cpp columns without a note: `LLAMA_ATTN_ROT_DISABLE=1` (plain KV types, like kvbench's). "
             "llama.cpp's default for a quantized KV type with head size % 64 == 0 is to multiply Q, K and V "
             "by a Walsh-Hadamard matrix before storing (llama-kv-cache.cpp `attn_rot_k/v`): its own column.", "",
             "| KV | kvbench exact | kvbench ggml-cpu | llama.cpp (in-process) | llama-perplexity (printed) | "
             "ggml-cpu / llama.cpp | paired diff ± SE | kernel share | verdict | llama.cpp default (rotated): in-process / printed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kv in kvs:
        r = doc["kv"][kv]
        e, g, lc, lp = r["kvbench_exact"], r["kvbench_ggml-cpu"], r["llamacpp"], r["llama_perplexity"]
        v = r["verdict"]
        lp_s = f"{lp['mean_kld']:.3e} ± {lp['mean_kld_se']:.1e}" if lp.get("mean_kld") is not None else "—"
        verdict = "**pass**" if v["pass"] else ("fail: " + ", ".join(
            n for n, ok in (("not within 20%", v["within_20pct"]), ("not within 3 SE", v["within_3se"])) if not ok))
        share = r["attribution"]["kernel_share_pct"]
        lines.append(f"| {kv} | {e['mean_kld']:.3e} ± {e['se']:.1e} | {g['mean_kld']:.3e} ± {g['se']:.1e} | "
                     f"{lc['mean_kld']:.3e} ± {lc['se']:.1e} | {lp_s} | {g['ratio_to_llamacpp']:.3f} | "
                     f"{g['paired_diff']:+.2e} ± {g['paired_diff_se']:.1e} | "
                     f"{'—' if share is None else f'{share:.0f}%'} | {verdict} | {_rot_cell(r)} |")
    lines += ["", "The bar (issue 15 item 8): kvbench `ggml-cpu` Mean KLD within 20% of llama.cpp's and within 3 "
              "standard errors of the paired per-position difference.", "", "![KLD](kld.png)", "",
              "llama-perplexity's own KL block per KV type is in `kld.json` (`kld_block`)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
