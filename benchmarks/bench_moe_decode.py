"""MoE decode on one GPU: eager vs CUDA-graph step, every KV dtype, two depths, one call.

Contract: ensures the synth model (coder30b-synth by default: generated on the machine the
first time, ~1 minute, 18 GB), measures the device copy bandwidth, times the one-token MoE
kernel alone (``engine.kernels.moe``: the default tiles, a small sweep of tile sizes, and the
index_select + bmm path it replaced; ``triton.testing.do_bench``, L2 flushed between calls),
then loads the model once with every weight and expert on the device (``--weight-format``,
no budget: the expert cache holds every expert) and, reusing those weights for each KV dtype
x depth (``engine.load(..., weights_from=eng)``: KV and expert cache made anew), times decode
on each path (``eager``: host-routed MoE through the SLRU; ``cuda_graph``: the captured
device-routed step; on CPU ``static`` with the Triton kernels interpreted). A path's number
is tok/s over ``--steps`` greedy-shaped steps (a seeded random token stream, argmax read
back each step), median of ``--reps`` repetitions with min/max/quartiles and raw samples;
beside it the bytes one token reads (weights, the k experts per layer, KV at that depth, the
head: ``bench_coder30b.bytes_per_token``), GB/s and the fraction of the copy roofline.
Depth: a real prefill of ``--prompt`` tokens, then (``--fill position``, default) the
position is set to the depth, the rows in between left as allocated: decode reads every row
below the position whatever it holds, so the time is a real one at that depth (``--fill
prefill`` prefills the whole depth instead, minutes at 16384). ``torch.profiler`` summarises
one step per path (top kernels by device time, kernel count, time per category). A failing
variant is recorded under ``failed`` and the run goes on; ``--max-seconds`` skips what no
longer fits. Writes ``--out`` JSON; the last stdout line is a compact JSON document.

Settings variants (``--variants``, issue 14.2): each (KV dtype, depth) case times every path
once per variant, a named set of ``KVBENCH_DECODE_*`` settings applied around its timing
(the static step is rebuilt and recaptured for each): ``default`` (the settings as the
environment has them: fused q/k/v, route kernel and device embedding on unless set off),
``baseline`` (all off: the step measured on 2026-12-03), ``no_fused_qkv``, ``no_fused_gate_up``,
``no_route_kernel``, ``no_device_embed``, ``only_fused_qkv``, ``only_route_kernel``,
``only_device_embed``, or an ad-hoc ``NAME:KEY=VALUE+KEY=VALUE``. The weights are loaded
once with the defaults (q/k/v stored fused, token_embd's device copy planned), so a variant
changes only what the step does. The case's ``paths`` hold the first variant's results (the
schema of one-variant runs); ``by_variant`` holds every variant's ``settings``, ``paths``
and ``path_errors``; summary rows carry ``variant``. ``--timing greedy`` (or ``both``) also
times the back-to-back greedy loop ``generate`` runs (``Engine.decode_greedy``: with the
device embedding, steps queued with no host round trip, tokens read back every
``KVBENCH_DECODE_READBACK`` steps) as ``greedy_tok_s``; ``decode`` (default) times only
``eng.decode`` + an argmax read-back per step (``tok_s``, as before).

    python benchmarks/bench_moe_decode.py --out moe_decode.json             # H200: ~4-5 min
    python benchmarks/bench_moe_decode.py --model tiny-qwen3moe --device cpu --depths 8,40 --steps 2
    python benchmarks/bench_moe_decode.py --kv bf16 --depths 16 --paths cuda_graph --timing both \
        --variants default,baseline,no_fused_qkv,no_route_kernel,no_device_embed --out v.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from engine import kernels, synth  # noqa: E402
from engine.errors import ConfigError, ModelNotFoundError  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def spread(xs: list[float]) -> dict:
    s = sorted(xs)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "rel_spread": (s[-1] - s[0]) / statistics.median(s) if statistics.median(s) else None}


# --- the MoE kernel alone ---------------------------------------------------------------------
SWEEP = {"gate_up": [dict(BLOCK_F=8, BLOCK_D=256, num_warps=4), dict(BLOCK_F=16, BLOCK_D=128, num_warps=4),
                     dict(BLOCK_F=16, BLOCK_D=512, num_warps=4), dict(BLOCK_F=32, BLOCK_D=256, num_warps=4),
                     dict(BLOCK_F=32, BLOCK_D=256, num_warps=8), dict(BLOCK_F=64, BLOCK_D=128, num_warps=8)],
         "down": [dict(BLOCK_D=4, BLOCK_F=256, num_warps=2), dict(BLOCK_D=8, BLOCK_F=512, num_warps=4),
                  dict(BLOCK_D=16, BLOCK_F=256, num_warps=4), dict(BLOCK_D=16, BLOCK_F=128, num_warps=4),
                  dict(BLOCK_D=32, BLOCK_F=256, num_warps=8)]}


def kernel_bench(spec, dev: torch.device, dtype: torch.dtype, sweep: bool) -> dict:
    """Microseconds per one-token MoE (k experts of spec's geometry out of E stacked), GB/s of
    the k experts' bytes: the Triton kernel at its default tiles and swept, and the
    index_select + bmm path that the eager decode used before."""
    import triton.testing
    from engine.kernels import moe
    E, ff, d, k = spec.n_experts, spec.d_ff_expert, spec.d_model, spec.n_experts_used
    g = torch.Generator(device=dev).manual_seed(0)
    gate, up = (torch.randn(E, ff, d, device=dev, generator=g).to(dtype) for _ in range(2))
    down = torch.randn(E, d, ff, device=dev, generator=g).to(dtype)
    x = torch.randn(1, d, device=dev, generator=g)
    ids = torch.randperm(E, device=dev, generator=g)[:k]
    w = torch.softmax(torch.randn(k, device=dev, generator=g), 0)
    nbytes = k * 3 * ff * d * gate.element_size()

    def old():                               # the replaced path: gather the k experts, then bmm
        gs, us, ds = gate.index_select(0, ids), up.index_select(0, ids), down.index_select(0, ids)
        xx = x.to(dtype).expand(k, -1).unsqueeze(-1)
        hh = (torch.nn.functional.silu(torch.bmm(gs, xx).float()) * torch.bmm(us, xx).float()).to(dtype)
        return (torch.bmm(ds, hh).float()[..., 0] * w[:, None]).sum(0, keepdim=True)

    def us_of(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3

    ref = moe.moe_decode_ref(x, gate, up, down, ids, w)
    got = moe.moe_decode(x, gate, up, down, ids, w)
    out = {"E": E, "ff": ff, "d": d, "k": k, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
           "max_abs_vs_ref": (got - ref).abs().max().item(), "default_config": json.loads(json.dumps(moe.CONFIG))}
    t = us_of(lambda: moe.moe_decode(x, gate, up, down, ids, w))
    out["triton_default"] = {"us": t, "gb_s": nbytes / t / 1e3}
    t = us_of(old)
    out["index_select_bmm"] = {"us": t, "gb_s": nbytes / t / 1e3}
    if sweep:
        rows, saved = [], json.loads(json.dumps(moe.CONFIG))
        try:
            for part, configs in SWEEP.items():
                for cfg in configs:
                    moe.CONFIG.update(json.loads(json.dumps(saved)))
                    moe.CONFIG[part] = cfg
                    try:
                        t = us_of(lambda: moe.moe_decode(x, gate, up, down, ids, w))
                        rows.append({"part": part, **cfg, "us": t, "gb_s": nbytes / t / 1e3})
                    except Exception as exc:   # noqa: BLE001 - a config that does not compile
                        rows.append({"part": part, **cfg, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        finally:
            moe.CONFIG.clear()
            moe.CONFIG.update(saved)
        out["sweep"] = rows
        ok = [r for r in rows if "us" in r]
        out["sweep_best"] = {p: min((r for r in ok if r["part"] == p), key=lambda r: r["us"], default=None)
                             for p in SWEEP}
    return out                               # the 1.2 GB of stacks go with this frame


# --- profiler -------------------------------------------------------------------------------
def categorize(name: str) -> str:
    n = name.lower()
    if "_moe_" in n:
        return "moe_experts"
    if "attn" in n or "attention" in n:
        return "attention"
    if "kv_append" in n:
        return "kv_append"
    if "topk" in n or "sort" in n or "softmax" in n:
        return "routing"
    if any(s in n for s in ("gemm", "gemv", "cublas", "nvjet", "sm90_", "cutlass", "splitk")):
        return "matmul"
    if n.startswith("triton_") or "fused" in n:
        return "fused_elementwise"
    if "copy" in n or "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


def profile_step(step, dev: torch.device, top: int = 15) -> dict:
    """One ``step()`` under torch.profiler: device kernels by total time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    step()
    sync(dev)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        step()
        sync(dev)
        wall = time.perf_counter() - t
    kern: dict[str, list] = {}
    for e in prof.events():
        if dev.type == "cuda" and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if dev.type != "cuda":
            us = e.cpu_time_total
        row = kern.setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += us
    total = sum(v[1] for v in kern.values())
    cats: dict[str, float] = {}
    for name, (_, us) in kern.items():
        cats[categorize(name)] = cats.get(categorize(name), 0.0) + us
    rows = sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]
    return {"wall_us": wall * 1e6, "device_us": total, "kernels": sum(v[0] for v in kern.values()),
            "by_category_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "count": c, "us": us, "share": us / total if total else None}
                    for n, (c, us) in rows]}


# --- settings variants -------------------------------------------------------------------------
DECODE_SETTINGS = {"fused_qkv": "KVBENCH_DECODE_FUSED_QKV", "route_kernel": "KVBENCH_DECODE_ROUTE_KERNEL",
                   "fused_gate_up": "KVBENCH_DECODE_FUSED_GATE_UP", "kv_pair": "KVBENCH_DECODE_KV_PAIR",
                   "fused_gemv": "KVBENCH_DECODE_FUSED_GEMV", "rope_append": "KVBENCH_DECODE_ROPE_APPEND",
                   "device_embed": "KVBENCH_DECODE_DEVICE_EMBED"}
# The attention kernel's tunables: applied values are the step's recorded launches
# (``StaticDecode.attn_launches``), so a variant setting one that the launch did not take (or
# that resolves to the default's launch) compares equal settings and is marked SAME STEP.
KERNEL_SETTINGS = {"KVBENCH_DECODE_BLOCK_N", "KVBENCH_DECODE_PROGRAMS_PER_SM", "KVBENCH_DECODE_WARPS",
                   "KVBENCH_DECODE_STAGES", "KVBENCH_DECODE_Q8_IMPL", "KVBENCH_DECODE_Q8_KERNEL",
                   "KVBENCH_DECODE_FUSE", "KVBENCH_DECODE_COMBINE_BLOCK", "KVBENCH_ATTN_PRECISION",
                   "KVBENCH_DECODE_Q8_TILES", "KVBENCH_DECODE_Q8_WORDS", "KVBENCH_DECODE_Q8_VNORM", "KVBENCH_DECODE_BF16_STACK",
                   "KVBENCH_DECODE_Q8_STACK", "KVBENCH_DECODE_Q8_PACK", "KVBENCH_DECODE_PDL", "KVBENCH_DECODE_Q8_SOFTMAX",
                   "KVBENCH_DECODE_Q8_EARLY",
                   # the MoE-blocks kernels' (recorded as ``StaticDecode.moe_launches``)
                   "KVBENCH_MOE_BLOCKS_FORM", "KVBENCH_MOE_BLOCKS_GU_BLOCK_F", "KVBENCH_MOE_BLOCKS_GU_BLOCK_K",
                   "KVBENCH_MOE_BLOCKS_GU_WARPS", "KVBENCH_MOE_BLOCKS_DOWN_BLOCK_D",
                   "KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K", "KVBENCH_MOE_BLOCKS_DOWN_WARPS",
                   "KVBENCH_MOE_BLOCKS_GU_SUMS", "KVBENCH_MOE_BLOCKS_DOWN_SUMS"}
VARIANTS = {"default": {}, "baseline": {v: "0" for v in DECODE_SETTINGS.values()}}
for _short, _name in DECODE_SETTINGS.items():
    VARIANTS[f"no_{_short}"] = {_name: "0"}
    VARIANTS[f"only_{_short}"] = {v: "1" if v == _name else "0" for v in DECODE_SETTINGS.values()}


def not_applied(env: dict[str, str], applied: dict | None) -> list[str]:
    """The variant's settings asked on (``"1"``) that the step did not apply (``applied``:
    StaticDecode's flags by short name, as ``time_path`` records them): such a variant measured
    the default step again, and its row must say so rather than pass for the setting's effect."""
    if not applied:
        return []
    short = {v: k for k, v in DECODE_SETTINGS.items()}
    return [name for name, value in env.items()
            if value == "1" and name in short and applied.get(short[name]) is False]


def mark_same_step(paths: dict, first_paths: dict, env: dict[str, str], first: str, where: str = "") -> None:
    """A variant that changes decode settings but applied the same ones as the first variant
    ran the same step: its comparison with that variant measures nothing. Mark each such
    path's result ``same_step_as`` (and say so)."""
    if not any(name in DECODE_SETTINGS.values() or name in KERNEL_SETTINGS for name in env):
        return
    kernel_only = not any(name in DECODE_SETTINGS.values() for name in env)
    for path, r in paths.items():
        base = first_paths.get(path) or {}
        if kernel_only and (r.get("settings") or {}).get("attn_launches") is None:
            continue                      # no launches recorded: nothing says the kernel was the same
        if r.get("settings") is not None and r.get("settings") == base.get("settings"):
            r["same_step_as"] = first
            print(f"  {where} {path}: SAME STEP as [{first}] (applied settings identical): this "
                  f"variant's difference measures nothing", flush=True)


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    """``default,baseline,...`` or ``NAME:KEY=VALUE+KEY=VALUE`` -> {name: {setting: value}}
    (every setting validated by ``engine.settings``)."""
    from engine import settings
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if ":" in item:
            name, _, body = item.partition(":")
            env = dict(kv.split("=", 1) for kv in body.split("+") if kv)
        elif item in VARIANTS:
            name, env = item, VARIANTS[item]
        else:
            raise SystemExit(f"error: --variants: unknown variant {item!r} (known: {', '.join(VARIANTS)}, "
                             f"or NAME:KVBENCH_X=V+KVBENCH_Y=W)")
        for key, value in env.items():
            if key not in settings.SETTINGS:
                raise SystemExit(f"error: --variants {name}: {key} is not a kvbench setting")
            settings._parse(settings.SETTINGS[key], value)     # malformed: ConfigError now, not mid-run
        out[name] = dict(env)
    return out or {"default": {}}


class applied_settings:
    """Set ``env`` in os.environ for a block, restore what was there after."""

    def __init__(self, env: dict[str, str]):
        self.env, self.saved = env, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- one variant ------------------------------------------------------------------------------
def time_path(eng, path: str, depth: int, prompt: list[int], args, stream: list[int], variant: str = "default") -> dict:
    dev = eng.device
    eng.set_decode_mode(path)                    # ConfigError when the path cannot be applied
    t = time.perf_counter()
    eng.prefill(prompt)
    if args.fill == "position":
        eng.pos = depth
    sync(dev)
    fill_s = time.perf_counter() - t
    at, j = eng.pos, 0

    def step():
        nonlocal j
        tok = stream[j % len(stream)]
        j += 1
        int(eng.decode(tok).argmax())           # a greedy step's work and its sync

    def rewind():
        eng.pos = at                             # same depth for every repetition
    t = time.perf_counter()
    for _ in range(args.warmup):                 # capture / compile / preload happen here
        step()
    sync(dev)
    warm_s = time.perf_counter() - t
    steps = args.steps if path != "eager" else args.eager_steps
    samples = []
    for _ in range(args.reps):
        rewind()
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(dev)
        samples.append(steps / (time.perf_counter() - t))
    static = getattr(eng, "_static", None)
    r = {"path": path, "reason": eng.decode_path_reason, "fill_s": fill_s, "warmup_s": warm_s,
         "compiled": getattr(static, "compiled", None), "captured": getattr(static, "graph", None) is not None,
         "steps_per_rep": steps, "tok_s": spread(samples), "tok_s_samples": samples}
    if static is not None:
        r["settings"] = {"fused_qkv": static.fused_qkv, "route_kernel": static.route_kernel,
                         "device_embed": static.device_embed, "fused_gate_up": static.fused_gate_up,
                         "fused_gemv": static.fused_gemv, "rope_append": static.rope_append,
                         "attn_launches": getattr(static, "attn_launches", None),
                         "moe_launches": getattr(static, "moe_launches", None)}
    if args.timing in ("greedy", "both") and path != "eager":
        greedy = []                              # generate's loop: back to back, batched read-backs
        for _ in range(args.reps):
            rewind()
            sync(dev)
            t = time.perf_counter()
            eng.decode_greedy(stream[j % len(stream)], steps)
            sync(dev)
            greedy.append(steps / (time.perf_counter() - t))
        from engine import settings
        r.update(greedy_tok_s=spread(greedy), greedy_tok_s_samples=greedy,
                 readback=settings.get("KVBENCH_DECODE_READBACK"))
    key = (variant, path)
    if args.profile == "all" or (args.profile == "first" and not args._profiled.get(key)):
        rewind()
        try:
            r["profile"] = profile_step(step, dev)
            args._profiled[key] = True
        except Exception as exc:                 # noqa: BLE001 - the profiler is optional evidence
            r["profile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return r


def run_variant(eng, kv: str, depth: int, args, bw: dict, stream: list[int]) -> dict:
    from bench_coder30b import bytes_per_token
    g = torch.Generator().manual_seed(depth)
    prompt = torch.randint(0, eng.spec.vocab_size, (min(args.prompt, depth) if args.fill == "position" else depth,),
                           generator=g).tolist()
    per_tok = bytes_per_token(eng, depth)["trunk"]
    st0 = eng.expert_cache.stats() if eng.expert_cache is not None else None
    out = {"kv": kv, "depth": depth, "ctx": eng.ctx, "kv_dtypes_applied": sorted(set(eng.kv_dtypes)),
           "expert_slots": eng.plan.expert_slots, "trunk_experts": eng.plan.trunk_experts,
           "n_gpu_layers": eng.plan.n_gpu_layers, "bytes_per_token": per_tok, "paths": {}, "path_errors": {},
           "embed_tier": getattr(eng.plan, "embed_tier", None), "by_variant": {}}
    for n, (variant, env) in enumerate(args.variants.items()):
        with applied_settings(env):
            res = time_paths(eng, kv, depth, prompt, args, bw, stream, per_tok, variant)
        out["by_variant"][variant] = {"settings": env, **res}
        if n == 0:                                # the first variant: the one-variant schema
            out["paths"], out["path_errors"] = res["paths"], res["path_errors"]
            first = variant
        else:
            mark_same_step(res["paths"], out["paths"], env, first, f"{kv:5} depth {depth:6}")
    if eng.expert_cache is not None:            # counts over this variant (every path, prefills included)
        st = eng.expert_cache.stats()
        c = {k: st[k] - st0[k] for k in ("hits", "misses", "evictions", "resident_hits", "preloaded", "bytes_moved")}
        c.update(resident=st["resident"], hit_rate=c["hits"] / max(c["hits"] + c["misses"], 1))
        out["expert_cache"] = c
    return out


def time_paths(eng, kv, depth, prompt, args, bw, stream, per_tok, variant: str) -> dict:
    """Every path of one case under the settings in force: {"paths", "path_errors"}."""
    out = {"paths": {}, "path_errors": {}}
    tag = "" if variant == "default" and len(args.variants) == 1 else f" [{variant}]"
    for path in args.paths:
        try:
            try:
                r = time_path(eng, path, depth, prompt, args, stream, variant)
            except ConfigError as exc:
                if "torch.compile" not in str(exc) or os.environ.get("KVBENCH_DECODE_COMPILE") == "0":
                    raise
                # the compiled capture failed: say so, and measure the uncompiled graph from here on
                doc_note = f"torch.compile failed ({str(exc)[:200]}); KVBENCH_DECODE_COMPILE=0 from here on"
                print(f"  {kv:5} depth {depth:6} {path}: {doc_note}", flush=True)
                os.environ["KVBENCH_DECODE_COMPILE"] = "0"
                r = time_path(eng, path, depth, prompt, args, stream, variant)
                r["compile_failed"] = doc_note
        except Exception as exc:                 # noqa: BLE001 - record, go on to the next path
            out["path_errors"][path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            out["path_errors"][path + "_trace"] = traceback.format_exc(limit=6)[-1500:]
            print(f"  {kv:5} depth {depth:6} {path}{tag}: FAILED {out['path_errors'][path]}", flush=True)
            continue
        r["not_applied"] = not_applied(args.variants.get(variant, {}), r.get("settings"))
        if r["not_applied"]:
            print(f"  {kv:5} depth {depth:6} {path}{tag}: NOT APPLIED {', '.join(r['not_applied'])} (the step ran "
                  f"without it: this row measures the default step)", flush=True)
        med = r["tok_s"]["median"]
        r.update(gb_s=med * per_tok / 1e9, roofline_tok_s=bw["copy"] / per_tok,
                 roofline_frac=med * per_tok / bw["copy"])
        out["paths"][path] = r
        greedy = f", greedy {r['greedy_tok_s']['median']:.2f} tok/s" if "greedy_tok_s" in r else ""
        print(f"  {kv:5} depth {depth:6} {path:10}{tag}: {med:8.2f} tok/s (min {r['tok_s']['min']:.2f}, max "
              f"{r['tok_s']['max']:.2f}), {r['gb_s']:7.1f} GB/s = {r['roofline_frac']:5.1%} of copy{greedy}; "
              f"warm-up {r['warmup_s']:.1f} s{launches_text(r)}", flush=True)
    return out


def launches_text(r: dict) -> str:
    """'; attention <kernel> <block_n>-key tiles x <stages> stages, ...' from the step's recorded
    launches (what ran, not what was asked); empty when none were recorded."""
    launches = (r.get("settings") or {}).get("attn_launches") or []
    parts = [f"{x['kernel'].lstrip('_')} {x['block_n']}x{x['num_stages']}st {x['num_warps']}w "
             f"{x['splits']} splits ({x['layers']} layers)" for x in launches]
    moe = [f"{x['part']} {x['form']} {x.get('BLOCK_F', x.get('BLOCK_D'))}x{x['BLOCK_K']} {x['num_warps']}w"
           for x in (r.get("settings") or {}).get("moe_launches") or []]
    return (f"; attention {', '.join(parts)}" if parts else "") + (f"; moe {', '.join(moe)}" if moe else "")


# --- CLI ----------------------------------------------------------------------------------------
def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="coder30b-synth", help="synth name, registry name or .gguf path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weight-format", default="bf16")
    p.add_argument("--expert-format", default="weights", choices=("weights", "blocks"),
                   help="routed experts at the weight format, or kept in the file's Q4_0/Q8_0 blocks "
                        "(engine.kernels.moe_blocks; every expert on the device: cpu_moe=0)")
    p.add_argument("--kv", default="fp32,bf16,q8_0")
    p.add_argument("--depths", default="16,16384", help="decode positions")
    p.add_argument("--paths", default=None, help="default: eager,cuda_graph on CUDA, eager,static on CPU")
    p.add_argument("--fill", choices=("position", "prefill"), default="position")
    p.add_argument("--prompt", type=int, default=16, help="tokens really prefilled with --fill position")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=32, help="steps per repetition (graph/static path)")
    p.add_argument("--eager-steps", type=int, default=8, help="steps per repetition (eager path)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", choices=("all", "first", "none"), default="all",
                   help="profile one step of each path in every variant / the first variant only / never")
    p.add_argument("--variants", default="default",
                   help="settings variants timed in every case: " + ", ".join(VARIANTS) + " or NAME:KEY=V+KEY=W")
    p.add_argument("--timing", choices=("decode", "greedy", "both"), default="decode",
                   help="decode: eng.decode + argmax read-back per step (tok_s); greedy: also the back-to-back "
                        "greedy loop of generate (greedy_tok_s); both: the two")
    p.add_argument("--no-kernel-bench", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="kernel bench at the default tiles only")
    p.add_argument("--max-seconds", type=float, default=330.0, help="skip variants that would end after this")
    p.add_argument("--out", default=None)


def main(args) -> int:
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    args.paths = (args.paths or ("eager,cuda_graph" if dev.type == "cuda" else "eager,static")).split(",")
    args.variants = parse_variants(args.variants) if isinstance(args.variants, str) else args.variants
    args._profiled = {}
    if dev.type == "cpu" and any(p != "eager" for p in args.paths):
        kernels.set_backend("triton")            # the static step needs the kernels (interpreted)
    kvs = args.kv.split(",")
    depths = [int(x) for x in args.depths.split(",")]
    doc = {"bench": "moe_decode", "model": args.model, "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "weight_format": args.weight_format, "paths": args.paths,
           "expert_format": args.expert_format,
           "fill": args.fill, "reps": args.reps, "steps": args.steps, "eager_steps": args.eager_steps,
           "settings_variants": args.variants, "timing": args.timing,
           "variants": [], "skipped": [], "failed": []}
    try:
        import triton
        doc["triton"] = triton.__version__
    except ImportError:
        pass
    t = time.perf_counter()
    model = args.model
    try:
        synth.config(model)
        model = synth.ensure(model)
    except ModelNotFoundError:
        pass                                         # a registry name or a path
    doc["ensure_s"] = time.perf_counter() - t
    print(f"model {args.model} ready in {doc['ensure_s']:.1f} s", flush=True)
    from bench_coder30b import bandwidths
    bw = bandwidths(dev, 1 << 30 if dev.type == "cuda" else 16 << 20)
    doc["bandwidth_bytes_s"] = bw
    print(f"device copy {bw['copy'] / 1e9:.0f} GB/s", flush=True)
    from engine.planner import spec_for_model
    spec = spec_for_model(model)
    if not args.no_kernel_bench and dev.type == "cuda" and spec.moe_layers:
        try:
            kb = kernel_bench(spec, dev, {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.weight_format,
                                                                                            torch.float32),
                              sweep=not args.no_sweep)
            doc["kernel"] = kb
            print(f"MoE kernel alone (k={kb['k']} of {kb['E']}, {kb['bytes'] / 1e6:.1f} MB): Triton "
                  f"{kb['triton_default']['us']:.1f} us ({kb['triton_default']['gb_s']:.0f} GB/s), index_select+bmm "
                  f"{kb['index_select_bmm']['us']:.1f} us; best sweep {kb.get('sweep_best')}", flush=True)
        except Exception as exc:                 # noqa: BLE001
            doc["kernel_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"kernel bench FAILED: {doc['kernel_error']}", flush=True)
        torch.cuda.empty_cache()                 # the planner's budget is the free memory
    stream = torch.randint(0, spec.vocab_size, (4096,), generator=torch.Generator().manual_seed(7)).tolist()
    margin = args.warmup + args.reps * max(args.steps, args.eager_steps) + 2 * max(args.steps, args.eager_steps) + 8
    eng, spent = None, []
    for kv in kvs:
        for depth in depths:
            case = {"kv": kv, "depth": depth}
            elapsed = time.perf_counter() - t_start
            est = spent[-1] if spent else 0.0       # the first variant also compiled: use the latest
            if elapsed + est > args.max_seconds:
                doc["skipped"].append({**case, "reason": f"estimated {est:.0f} s after {elapsed:.0f} s exceeds "
                                                         f"--max-seconds {args.max_seconds:g}"})
                print(f"skip {kv} depth {depth}: {doc['skipped'][-1]['reason']}", flush=True)
                continue
            t0 = time.perf_counter()
            kw = dict(device=dev, kv_dtype=kv, ctx=depth + margin, weight_format=args.weight_format,
                      expert_format=args.expert_format, cpu_moe=0 if args.expert_format == "blocks" else None)
            try:
                fresh = eng is None
                eng = engine.load(model, **kw) if fresh else engine.load(model, weights_from=eng, **kw)
                load_s = time.perf_counter() - t0
                print(f"{kv} depth {depth}: {'loaded' if fresh else 'weights reused'} in {load_s:.1f} s, "
                      f"expert slots {eng.plan.expert_slots}/{eng.plan.trunk_experts}, auto path "
                      f"{eng.decode_path} ({eng.decode_path_reason})", flush=True)
                v = run_variant(eng, kv, depth, args, bw, stream)
                v.update(load_s=load_s, fresh_load=fresh)
            except Exception as exc:             # noqa: BLE001 - record it, go on
                doc["failed"].append({**case, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                      "trace": traceback.format_exc(limit=6)[-1500:]})
                print(f"FAIL {kv} depth {depth}: {doc['failed'][-1]['error']}", flush=True)
                if eng is not None and eng.model is None:
                    eng = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            v["variant_s"] = time.perf_counter() - t0
            spent.append(v["variant_s"] - (v["load_s"] if v["fresh_load"] else 0))
            doc["variants"].append(v)
    doc["total_s"] = time.perf_counter() - t_start
    print(table(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary(doc), separators=(",", ":")))
    return 0


def table(doc: dict) -> str:
    head = (f"{'kv':5} {'depth':>6} {'path':10} {'variant':16} {'tok/s':>8} {'min':>8} {'max':>8} {'GB/s':>7} "
            f"{'%copy':>6} {'kernels':>7} {'greedy':>8}")
    lines = [head, "-" * len(head)]
    for v in doc["variants"]:
        for variant, path, r in _rows(v):
            prof = r.get("profile", {})
            greedy = f"{r['greedy_tok_s']['median']:8.2f}" if "greedy_tok_s" in r else f"{'-':>8}"
            lines.append(f"{v['kv']:5} {v['depth']:6} {path:10} {variant:16} {r['tok_s']['median']:8.2f} "
                         f"{r['tok_s']['min']:8.2f} {r['tok_s']['max']:8.2f} {r['gb_s']:7.1f} {r['roofline_frac']:6.1%} "
                         f"{prof.get('kernels', '-'):>7} {greedy}"
                         + (f"  NOT APPLIED: {', '.join(r['not_applied'])}" if r.get("not_applied") else "")
                         + (f"  SAME STEP AS {r['same_step_as']}" if r.get("same_step_as") else ""))
    return "\n".join(lines)


def _rows(v: dict):
    """(variant, path, result) of one case: every settings variant (older JSON: ``paths`` only)."""
    by = v.get("by_variant") or {"default": {"paths": v["paths"]}}
    for variant, res in by.items():
        for path, r in res["paths"].items():
            yield variant, path, r


def summary(doc: dict) -> dict:
    kb = doc.get("kernel") or {}
    return {"model": doc["model"], "total_s": round(doc["total_s"], 1), "ensure_s": round(doc["ensure_s"], 1),
            "copy_gb_s": round(doc["bandwidth_bytes_s"]["copy"] / 1e9, 1),
            "moe_kernel_us": round(kb["triton_default"]["us"], 2) if kb else None,
            "old_moe_us": round(kb["index_select_bmm"]["us"], 2) if kb else None,
            "tok_s": [{"kv": v["kv"], "depth": v["depth"], "path": p, "median": round(r["tok_s"]["median"], 2),
                       "min": round(r["tok_s"]["min"], 2), "max": round(r["tok_s"]["max"], 2),
                       "roof": round(r["roofline_frac"], 3),
                       **({"variant": var} if len(v.get("by_variant") or {}) > 1 else {}),
                       **({"greedy": round(r["greedy_tok_s"]["median"], 2)} if "greedy_tok_s" in r else {}),
                       **({"not_applied": r["not_applied"]} if r.get("not_applied") else {}),
                       **({"same_step_as": r["same_step_as"]} if r.get("same_step_as") else {})}
                      for v in doc["variants"] for var, p, r in _rows(v)],
            "path_errors": [(v["kv"], v["depth"], p) for v in doc["variants"] for p in v["path_errors"]
                            if not p.endswith("_trace")] +
                           [(v["kv"], v["depth"], f"{p} [{var}]") for v in doc["variants"]
                            for i, (var, res) in enumerate((v.get("by_variant") or {}).items()) if i
                            for p in res["path_errors"] if not p.endswith("_trace")],
            "skipped": [(s["kv"], s["depth"]) for s in doc["skipped"]],
            "failed": [(s["kv"], s["depth"]) for s in doc["failed"]]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(ap)
    raise SystemExit(main(ap.parse_args()))
