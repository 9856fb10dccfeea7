"""Decode attention kernel against kernel: llama.cpp's flash-attention kernels and kvbench's, both
timed by Nsight Compute on the same device, at the same geometry and depths, per KV dtype.

Contract. ``run`` measures, in one process tree on one GPU:
- **llama.cpp**: ``llama-bench -fa 1 -ngl 99 -p 0 -d DEPTH -n N -r 1 -ctk T -ctv T`` on
  ``attnbench-synth`` (``engine.synth``: llama, 32 query heads, 8 KV heads x 128, the geometry of
  ``bench_attention``'s targets; 2 layers), under ``ncu --clock-control none --cache-control all
  --metrics gpu__time_duration.sum`` with a kernel-name filter (``--llama-filter``, default every
  ``flash_attn*`` kernel: the vector kernel a decode token takes at this geometry, its combine and
  stream-k fixups, the mask pre-pass). llama-bench runs twice, ``N = --na`` and ``N = --nb``: the
  launch counts' difference says how many filtered launches a decode token makes a layer, and
  the second run's last ``nb`` tokens' launches (decoding comes after the warm-up and the depth's
  prefill) give the attention time a decode token pays a layer at that depth (median token).
- **kvbench**: ``decode_attention`` at the same (dtype, ctx), ``--reps`` calls, in a child process
  under the same ncu flags and filter ``_decode_``; a marker kernel between (dtype, ctx) groups
  splits the launch sequence. A call's time is its launches' sum (the split kernel and the
  combine); the row is the median call.
- Both sides: every kernel starts with L2 flushed (``--cache-control all``, as a decode step's
  layers find their KV out of L2); kernel durations only, so neither side's launch gaps count
  (``bench_attention``'s ``layered_us`` includes kvbench's). Per row: us a layer, the KV bytes a
  layer reads (ctx x 8 heads x 128 x 2 at the dtype's bytes a value: f16 / bf16 2, q8_0 34 / 32,
  fp32 4), GB/s and % of a device-to-device copy measured in the same run, each kernel's share,
  and per dtype kvbench / llama.cpp. The issue's kernel targets (q8_0 >= 60% of copy and >= 2.5x
  fp32; bf16 >= 1.8x fp32; fp32 >= 70% of copy) are printed beside llama.cpp's own ratios
  (q8_0 / f16), so a reader sees what the field's reference reaches at the same bytes.
- A side that measured nothing (ncu missing or refused, no kernel matched, a non-positive
  difference) is a row with ``us`` None and its reason, never a number.

    python benchmarks/bench_llamacpp.py build .devcarry/llamacpp-src.tar.gz /tmp/lcb
    python benchmarks/peer_attention.py run --bin /tmp/lcb/bin/llama-bench --out peer_attention.json
    python benchmarks/peer_attention.py merge ours.json llama.json --out peer.json --plot peer.png

``merge`` joins runs of one device and geometry (kvbench's rows and llama.cpp's from two calls on
the same machine) and recomputes the verdicts across them; a (peer, kv, ctx) in two inputs, or
inputs from different devices, are refused in one line (exit 2).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEOMETRY = {"n_kv_heads": 8, "head_dim": 128, "n_heads": 32}
LLAMA_KV = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}            # bytes a value
OURS_KV = {"fp32": 4.0, "bf16": 2.0, "q8_0": 34 / 32}
NCU_FLAGS = ["--clock-control", "none", "--cache-control", "all", "--metrics", "gpu__time_duration.sum",
             "--csv", "--page", "raw", "--print-units", "base"]
MARKER = "_decode_marker_kernel"


def ncu_kernels(text: str, metrics: tuple[str, ...] = ()) -> list[dict]:
    """The profiled kernels of ncu's ``--csv --page raw --print-units base`` output, in launch
    order: ``{"id", "name", "ns"}``, plus each of ``metrics`` as ncu printed it (None where the
    column is missing). Lines before the CSV header (the program's own output, ncu's ``==PROF==``
    lines) are skipped; the units row after the header is skipped."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(ln for ln in lines[start:] if ln.startswith('"')))))
    head = rows[0]
    try:
        i_id, i_name, i_ns = head.index("ID"), head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    except ValueError as e:
        raise ValueError(f"ncu CSV lacks a column ({e}); header: {head[:12]}") from None
    out = []
    for r in rows[1:]:
        if len(r) <= max(i_id, i_name, i_ns):
            continue
        try:
            row = {"id": int(r[i_id]), "name": r[i_name], "ns": float(r[i_ns].replace(",", ""))}
        except ValueError:
            continue                      # the units row ("", "", ..., "nsecond")
        for m in metrics:
            j = head.index(m) if m in head else None
            row[m] = r[j] if j is not None and j < len(r) else None
        out.append(row)
    return out


def base_name(name: str) -> str:
    """A demangled kernel name without its return type, arguments and template arguments."""
    s = name.split("(")[0]
    depth, out = 0, []
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).split()[-1] if "".join(out).split() else name


def by_name(kernels: list[dict]) -> dict[str, float]:
    """Summed ns a base kernel name."""
    out: dict[str, float] = {}
    for k in kernels:
        n = base_name(k["name"])
        out[n] = out.get(n, 0.0) + k["ns"]
    return out


def token_layer_us(a: list[dict], b: list[dict], na: int, nb: int, layers: int) -> tuple[float | None, dict, str]:
    """Per decode token and layer, from two runs that differ only by ``nb - na`` decode tokens:
    (us, {kernel: us}, reason). The launch counts' difference gives the filtered launches a token
    and layer (``k``, an integer or the row is refused); run b's last ``nb * layers * k`` launches are
    its decode tokens (llama-bench decodes after the warm-up and the depth's prefill), cut into
    tokens; ``us`` is the median token's sum over its layers / layers. Taking b's tail rather than
    subtracting sums keeps the prefill's run-to-run noise (its kernels take far longer than a
    token's) out of the number. ``us`` None, with the reason, where no such split exists."""
    if not b:
        return None, {}, "no kernel matched the filter"
    extra = len(b) - len(a)
    per_tok = extra / ((nb - na) * layers)
    if extra <= 0 or per_tok != int(per_tok):
        return None, {}, (f"{len(a)} launches at {na} tokens, {len(b)} at {nb}: not a whole number of "
                          f"launches a token and layer")
    k = int(per_tok) * layers
    tail = b[-nb * k:]
    toks = [sum(x["ns"] for x in tail[i * k:(i + 1) * k]) / layers / 1e3 for i in range(nb)]
    kernels = {n: round(v / nb / layers / 1e3, 3) for n, v in by_name(tail).items()}
    return statistics.median(toks), kernels, ""


def split_groups(kernels: list[dict]) -> list[list[dict]]:
    """kvbench's launches split at the marker kernels: one list a (dtype, ctx) group."""
    groups, cur = [], []
    for k in kernels:
        if MARKER in k["name"]:
            groups.append(cur)
            cur = []
        else:
            cur.append(k)
    if cur:
        groups.append(cur)
    return groups


def call_times(group: list[dict], per_call: int) -> list[float]:
    """A group's launches cut into calls of ``per_call`` launches: each call's us."""
    return [sum(k["ns"] for k in group[i:i + per_call]) / 1e3 for i in range(0, len(group) - per_call + 1, per_call)]


def kv_bytes(ctx: int, bytes_per_value: float) -> int:
    return int(ctx * GEOMETRY["n_kv_heads"] * GEOMETRY["head_dim"] * 2 * bytes_per_value)


def _which_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for root in ("/usr/local/cuda/bin", "/opt/nvidia"):
        for p in sorted(Path(root).glob("**/ncu")) if Path(root).exists() else []:
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def _ncu(ncu: str, flt: str, cmd: list[str], log: Path, timeout: int) -> tuple[list[dict], str, str]:
    """Run ``cmd`` under ncu with kernel filter ``flt``: (kernels, error or "", the program's stdout)."""
    full = [ncu, *NCU_FLAGS, "-k", f"regex:{flt}", "--log-file", str(log), *cmd]
    try:
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout} s: {' '.join(full)}", ""
    text = log.read_text() if log.exists() else ""
    try:
        ks = ncu_kernels(text)
    except ValueError as e:
        return [], str(e), p.stdout
    if p.returncode != 0 and not ks:
        tail = (p.stderr or p.stdout or text)[-600:]
        return [], f"rc {p.returncode}: {tail.strip()}", p.stdout
    return ks, "", p.stdout


# ------------------------------------------------------------------------------- kvbench, in the child


def _marker():
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_marker_kernel(X):
        tl.store(X, tl.load(X) + 1)
    return _decode_marker_kernel


def ours_child(args) -> int:
    """Under ncu: each (dtype, ctx) group's ``--reps`` decode_attention calls, a marker after each
    group. Prints one JSON line: the groups in order and each group's applied launch configuration."""
    import torch

    from engine.kernels import decode_attention as dmod
    from engine.kv import LayerKV
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_attention import fill_cache

    hkv, d, hq = GEOMETRY["n_kv_heads"], GEOMETRY["head_dim"], GEOMETRY["n_heads"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(hq, d, device="cuda", generator=gen)
    flag = torch.zeros(1, device="cuda", dtype=torch.int32)
    marker = _marker()
    ctxs = [int(c) for c in args.ctxs.split(",")]
    groups = []
    for fmt in args.dtypes.split(","):
        cache = LayerKV(0, hkv, d, max(ctxs), fmt, device="cuda")
        fill_cache(cache, max(ctxs), gen)
        for ctx in ctxs:
            dmod.decode_attention(q, cache.k, cache.v, fmt, ctx, d ** -0.5, hkv)   # compile, outside the count
            torch.cuda.synchronize()
            marker[(1,)](flag)
            with dmod.recording() as rec:
                for _ in range(args.reps):
                    dmod.decode_attention(q, cache.k, cache.v, fmt, ctx, d ** -0.5, hkv)
            torch.cuda.synchronize()
            marker[(1,)](flag)
            groups.append({"dtype": fmt, "ctx": ctx, "calls": args.reps, "config": dmod.LAUNCHES.distinct(rec)})
        del cache
    torch.cuda.synchronize()
    print(json.dumps({"groups": groups}, default=str))
    return 0


def ours(ncu: str, args, work: Path) -> list[dict]:
    """kvbench's rows (the child under ncu)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "ours-child", "--dtypes", args.ours_dtypes,
           "--ctxs", args.depths, "--reps", str(args.reps)]
    log = work / "ncu_ours.csv"
    ks, err, stdout = _ncu(ncu, "_decode_", cmd, log, args.timeout)
    applied = []
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            applied = json.loads(line).get("groups", [])
            break
    rows = []
    ctxs = [int(c) for c in args.depths.split(",")]
    want = [(f, c) for f in args.ours_dtypes.split(",") for c in ctxs]
    if err or not ks:
        return [{"peer": "kvbench", "kv": f, "ctx": c, "us": None, "reason": err or "no kernel matched"} for f, c in want]
    groups = split_groups(ks)
    # groups alternate: [warm-up call], [timed calls], ... (a marker after each)
    timed = groups[1::2]
    for (fmt, ctx), g in zip(want, timed):
        per_call = len(g) // args.reps if args.reps else 0
        if per_call == 0 or len(g) % args.reps:
            rows.append({"peer": "kvbench", "kv": fmt, "ctx": ctx, "us": None,
                         "reason": f"{len(g)} launches for {args.reps} calls"})
            continue
        times = call_times(g, per_call)
        us = statistics.median(times)
        rows.append({"peer": "kvbench", "kv": fmt, "ctx": ctx, "us": round(us, 3), "us_min": round(min(times), 3),
                     "launches_a_call": per_call, "calls": len(times),
                     "kernels": {n: round(v / len(times) / 1e3, 3) for n, v in by_name(g).items()},
                     "bytes": kv_bytes(ctx, OURS_KV[fmt]),
                     "applied": next((a["config"] for a in applied if (a["dtype"], a["ctx"]) == (fmt, ctx)), None)})
    if len(timed) < len(want):
        for fmt, ctx in want[len(timed):]:
            rows.append({"peer": "kvbench", "kv": fmt, "ctx": ctx, "us": None, "reason": "group missing in ncu's output"})
    return rows


def llama(ncu: str, args, model: Path, work: Path, save=lambda rows: None) -> list[dict]:
    rows = []
    for ctk in args.llama_kv.split(","):
        for depth in [int(c) for c in args.depths.split(",")]:
            got = {}
            err = ""
            for n in (args.na, args.nb):
                cmd = [args.bin, "-m", str(model), "-fa", "1", "-ngl", "99", "-p", "0", "-n", str(n), "-d", str(depth),
                       "-r", "1", "-ctk", ctk, "-ctv", ctk, "-o", "json"]
                ks, e, _ = _ncu(ncu, args.llama_filter, cmd, work / f"ncu_llama_{ctk}_{depth}_{n}.csv", args.timeout)
                if e:
                    err = e
                    break
                got[n] = ks
            if err:
                rows.append({"peer": "llama.cpp", "kv": ctk, "ctx": depth, "us": None, "reason": err})
                continue
            us, kernels, reason = token_layer_us(got[args.na], got[args.nb], args.na, args.nb, args.layers)
            row = {"peer": "llama.cpp", "kv": ctk, "ctx": depth, "us": None if us is None else round(us, 3),
                   "kernels": kernels, "tokens": args.nb, "bytes": kv_bytes(depth, LLAMA_KV[ctk]),
                   "launches": [len(got[args.na]), len(got[args.nb])]}
            if reason:
                row["reason"] = reason
            rows.append(row)
            print(f"  llama.cpp {ctk:5} depth {depth:6}: {row['us']} us a layer  {kernels}", flush=True)
            save(rows)
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per ctx: kvbench's target ratios and llama.cpp's own, each with what it was measured from."""
    at = {(r["peer"], r["kv"], r["ctx"]): r for r in rows}
    out = []
    for ctx in sorted({r["ctx"] for r in rows}):
        def us(peer, kv):
            r = at.get((peer, kv, ctx))
            return r["us"] if r and r.get("us") else None
        v = {"ctx": ctx}
        o32, o16, oq, l16, lb, lq = (us("kvbench", "fp32"), us("kvbench", "bf16"), us("kvbench", "q8_0"),
                                     us("llama.cpp", "f16"), us("llama.cpp", "bf16"), us("llama.cpp", "q8_0"))
        v["kvbench_q8_0_over_fp32"] = round(o32 / oq, 3) if o32 and oq else None
        v["kvbench_bf16_over_fp32"] = round(o32 / o16, 3) if o32 and o16 else None
        v["kvbench_q8_0_over_bf16"] = round(o16 / oq, 3) if o16 and oq else None
        v["llama_q8_0_over_f16"] = round(l16 / lq, 3) if l16 and lq else None
        v["q8_0_kvbench_over_llama"] = round(lq / oq, 3) if lq and oq else None      # > 1: kvbench faster
        v["bf16_kvbench_over_llama_f16"] = round(l16 / o16, 3) if l16 and o16 else None
        v["bf16_kvbench_over_llama_bf16"] = round(lb / o16, 3) if lb and o16 else None
        out.append(v)
    return out


def print_table(doc: dict) -> None:
    print(f"\n{'peer':10} {'kv':5} {'ctx':>6} {'us/layer':>9} {'GB/s':>8} {'%copy':>6}  kernels / reason")
    for r in doc["rows"]:
        extra = r.get("reason") or ", ".join(f"{k} {v}" for k, v in sorted((r.get("kernels") or {}).items()))
        print(f"{r['peer']:10} {r['kv']:5} {r['ctx']:>6} {str(r.get('us')):>9} {str(r.get('GBps')):>8} "
              f"{str(r.get('pct_copy')):>6}  {extra[:160]}")
    for v in doc["verdicts"]:
        print(json.dumps(v))


class MergeError(ValueError):
    """A set of ``run`` outputs that cannot be read as one measurement (one line, exit 2)."""


def merge(docs: list[tuple[str, dict]]) -> dict:
    """``run`` outputs of one session (e.g. kvbench's rows and llama.cpp's from two calls on the
    same warm machine) as one document: the rows of all, the verdicts recomputed across them.
    Refused: an input without a 'rows' list or with a row lacking (peer, kv, ctx), different
    devices or geometries, or a (peer, kv, ctx) measured twice."""
    if not docs:
        raise MergeError("nothing to merge: pass the run JSONs")
    first = docs[0][1]
    seen: dict[tuple, str] = {}
    rows: list[dict] = []
    for name, d in docs:
        if not isinstance(d, dict) or not isinstance(d.get("rows"), list):
            raise MergeError(f"{name} is not a peer_attention run output (no 'rows' list)")
        for key in ("device", "geometry"):
            if d.get(key) != first.get(key):
                raise MergeError(f"{name}: {key} {d.get(key)!r} differs from {docs[0][0]}'s {first.get(key)!r}; "
                                 "merge runs of one device and geometry only")
        for r in d["rows"]:
            if not isinstance(r, dict) or not {"peer", "kv", "ctx"} <= r.keys():
                raise MergeError(f"{name}: a row without peer / kv / ctx ({str(r)[:80]})")
            k = (r["peer"], r["kv"], r["ctx"])
            if k in seen:
                raise MergeError(f"{name}: {k[0]} {k[1]} at ctx {k[2]} is also in {seen[k]}; keep one of them")
            seen[k] = name
            rows.append({**r, "source": name})
    rows.sort(key=lambda r: (r["peer"], ("fp32", "f16", "bf16", "q8_0").index(r["kv"])
                             if r["kv"] in ("fp32", "f16", "bf16", "q8_0") else 9, r["ctx"]))
    return {"command": " ".join(sys.argv), "merged": [n for n, _ in docs], "device": first.get("device"),
            "geometry": first.get("geometry"), "ncu_flags": first.get("ncu_flags"),
            "copy_GBps": {n: d.get("copy_GBps") for n, d in docs}, "rows": rows, "verdicts": verdicts(rows)}


def plot(doc: dict, path: str) -> None:
    """us a layer against depth, one line per (peer, KV dtype), with % of copy at each point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    style = {"kvbench": "-", "llama.cpp": "--"}
    colour = {"fp32": "tab:gray", "f16": "tab:purple", "bf16": "tab:blue", "q8_0": "tab:orange"}
    lines: dict[tuple, list] = {}
    for r in doc["rows"]:
        if r.get("us"):
            lines.setdefault((r["peer"], r["kv"]), []).append(r)
    for (peer, kv), rs in lines.items():
        xs, ys = [r["ctx"] for r in rs], [r["us"] for r in rs]
        ax.plot(xs, ys, style.get(peer, ":"), marker="o", color=colour.get(kv), label=f"{peer} {kv}")
        for r in rs:
            if r.get("pct_copy") is not None:
                ax.annotate(f"{r['pct_copy']:.0f}%", (r["ctx"], r["us"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=colour.get(kv))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context (keys)")
    ax.set_ylabel("us a layer (kernel time, L2 flushed)")
    g = doc.get("geometry") or {}
    ax.set_title(f"decode attention, {g.get('n_heads')} q heads, {g.get('n_kv_heads')} KV heads x "
                 f"{g.get('head_dim')}: {doc.get('device')} (labels: % of copy)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import torch
    ncu = args.ncu or _which_ncu()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    doc: dict = {"command": " ".join(sys.argv), "geometry": GEOMETRY, "ncu": ncu,
                 "ncu_flags": NCU_FLAGS, "llama_filter": args.llama_filter, "na": args.na, "nb": args.nb,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if not torch.cuda.is_available():
        print("peer_attention: no CUDA device (this benchmark times GPU kernels); run it on the GPU machine",
              file=sys.stderr)
        return 2
    if ncu is None:
        print("peer_attention: Nsight Compute (ncu) not found on PATH or under /usr/local/cuda, /opt/nvidia; "
              "pass --ncu PATH", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_attention import copy_bandwidth
    doc["copy_GBps"] = round(copy_bandwidth(10), 1)
    print(f"copy {doc['copy_GBps']} GB/s; ncu {ncu}", flush=True)
    rows: list[dict] = []
    t0 = time.time()
    if args.bin:
        from engine import synth
        model = Path(args.model) if args.model else synth.ensure("attnbench-synth")
        doc["model"] = str(model)
        def save(done):     # each row as it lands: a call cut short keeps what it measured
            if args.out:
                Path(args.out + ".partial").write_text(json.dumps({**doc, "rows": done}, indent=1))
        rows += llama(ncu, args, model, work, save)
    doc["llama_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    if args.ours_dtypes:
        rows += ours(ncu, args, work)
    doc["ours_s"] = round(time.time() - t0, 1)
    for r in rows:
        if r.get("us"):
            r["GBps"] = round(r["bytes"] / (r["us"] * 1e-6) / 1e9, 1)
            r["pct_copy"] = round(100 * r["GBps"] / doc["copy_GBps"], 1)
    doc["rows"] = rows
    doc["verdicts"] = verdicts(rows)
    print_table(doc)
    text = json.dumps(doc)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    if args.plot and any(r.get("us") for r in rows):
        plot(doc, args.plot)
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="llama.cpp's and kvbench's decode attention kernels under ncu")
    r.add_argument("--bin", default=None, help="llama-bench (bench_llamacpp.py build); without it only kvbench's rows")
    r.add_argument("--model", default=None, help="GGUF for llama.cpp (default: attnbench-synth)")
    r.add_argument("--layers", type=int, default=2, help="the model's layers (attnbench-synth: 2)")
    r.add_argument("--depths", default="4096,16384,32768")
    r.add_argument("--llama-kv", default="f16,bf16,q8_0")
    r.add_argument("--ours-dtypes", default="fp32,bf16,q8_0", help="kvbench's KV dtypes ('' skips kvbench)")
    r.add_argument("--na", type=int, default=4)
    r.add_argument("--nb", type=int, default=12)
    r.add_argument("--reps", type=int, default=10)
    r.add_argument("--llama-filter", default="flash_attn")
    r.add_argument("--ncu", default=None)
    r.add_argument("--timeout", type=int, default=240)
    r.add_argument("--work", default="/tmp/peer_attention")
    r.add_argument("--out", default=None)
    r.add_argument("--plot", default=None, help="PNG of us a layer against depth (when a row measured)")
    c = sub.add_parser("ours-child", help=argparse.SUPPRESS)
    c.add_argument("--dtypes", required=True)
    c.add_argument("--ctxs", required=True)
    c.add_argument("--reps", type=int, required=True)
    m = sub.add_parser("merge", help="run outputs of one device (e.g. two calls) as one table, verdicts across them")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--plot", default=None, help="PNG of us a layer against depth")
    args = p.parse_args(argv)
    if args.cmd == "ours-child":
        return ours_child(args)
    if args.cmd == "merge":
        try:
            docs = []
            for name in args.inputs:
                try:
                    docs.append((Path(name).name, json.loads(Path(name).read_text())))
                except (OSError, ValueError) as e:
                    raise MergeError(f"cannot read {name}: {e}") from None
            doc = merge(docs)
        except MergeError as e:
            print(f"peer_attention: {e}", file=sys.stderr)
            return 2
        print_table(doc)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        if args.plot:
            plot(doc, args.plot)
        return 0
    if args.na >= args.nb or args.na < 1:
        print(f"peer_attention: --na {args.na} must be >= 1 and below --nb {args.nb}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
