"""``python -m engine plan MODEL``: the memory plan of a model, from its metadata only.

Contract: ``add_cli_args(parser)`` / ``main(args) -> int`` (exit 0, or 2 with one ``error:``
line: bad input, or a plan that does not fit the host RAM, which is printed first so a
what-if stays readable). ``format_plan(plan)`` is the load-log style banner (layers per
tier, MiB per category, expert slots, KV per layer kind, host RAM), and the bytes one decode
token reads at depth 0 and at ``--ctx`` (``planner.decode_read_bytes``: a roofline's
numerator).

    python -m engine plan coder30b-synth --kv-dtype q8_0 --ctx 32768 --vram-budget 12GiB
    python -m engine plan coder30b-synth --kv-dtype q8_0 --vram-budget 12GiB --expert-blocks q4_0 --cpu-moe auto
"""
from __future__ import annotations

import argparse
import json
import sys

from typing import TYPE_CHECKING

from .errors import EngineError, OutOfMemoryError
from .formats import DEFAULT_RESERVE, DEFAULT_WAVE_BUDGET, KV_DTYPES as KV_FORMATS, WEIGHT_FORMAT_CHOICES

if TYPE_CHECKING:      # the planner (torch, the kernels) loads when a plan is made: `--help` and bad flags stay fast
    from .planner import Plan


def format_reads(p: Plan, spec, depths) -> list[str]:
    """One line per depth: the bytes a decode token reads on the trunk and on the host
    (``planner.decode_read_bytes``), the roofline's numerator."""
    from .planner import _mib, decode_read_bytes
    out = []
    for d in depths:
        r = decode_read_bytes(p, spec, d)
        for tier in ("trunk", "host"):
            t = r[tier]
            if t["total"]:
                out.append(f"decode reads at depth {d} ({tier}): {_mib(t['total'])} (weights {_mib(t['weights'])}, "
                           f"experts {_mib(t['experts'])}, KV {_mib(t['kv'])}, head {_mib(t['head'])})")
    return out


def format_plan(p: Plan, spec=None, depths=()) -> str:
    """A load-log style banner: layers per tier, MiB per category, expert slots, KV tags, and
    with ``spec`` the bytes a decode token reads at each of ``depths``."""
    from .planner import CATEGORIES, MiB, _gib, _mib
    dev = "device" if p.device != "cpu" else "device (cpu)"
    wf = p.weight_format + (f" (auto: {p.weight_format_reason})" if p.weight_format_requested == "auto" else "")
    lines = [f"plan: {p.model} ({p.arch}, {p.n_layers} layers) on {p.device}: budget {_mib(p.budget_bytes)} "
             f"({p.budget_source}), ctx {p.ctx}, weights {wf}",
             f"offloaded {p.n_gpu_layers}/{p.n_layers} layers to {dev}; output head on {p.head_tier}",
             f"{'category':<14}{'trunk MiB':>14}{'host MiB':>14}"]
    for cat in (*CATEGORIES, "total"):
        t, h = (p.trunk.total, p.host.total) if cat == "total" else (p.trunk.get(cat), p.host.get(cat))
        lines.append(f"{cat:<14}{t / MiB:>14.2f}{h / MiB:>14.2f}")
    lines.append(f"{'free':<14}{p.free_bytes / MiB:>14.2f}")
    if p.expert_format != "weights":
        tiers = p.layer_expert_tiers
        on = [b for b, t in zip(p.layer_expert_bytes, tiers) if t == "trunk"]
        off = [b for b, t in zip(p.layer_expert_bytes, tiers) if t in ("cpu", "pcie", "dma")]
        how = {"cpu": "on the host CPU ({}: repacked for its int4 matmul, and the blocks for large batches)",
               "pcie": "on the host, read in place by the GPU over PCIe ({}: pinned blocks)",
               "dma": "on the host, the chosen ones copied to the GPU by DMA ({}: pinned blocks)"}[p.host_experts]
        lines.append(f"experts in {p.expert_format} blocks (cpu_moe {p.cpu_moe_requested} -> {p.cpu_moe}): "
                     f"{len(on)} MoE layers on the trunk ({_mib(sum(on))}), {len(off)} "
                     + how.format(_mib(sum(off))))
    elif p.expert_slot_bytes:
        lines.append(f"expert cache: {p.expert_slots}/{p.trunk_experts} slots x {_mib(p.expert_slot_bytes)} "
                     f"= {_mib(p.trunk.expert_cache)}")
    n_tail = p.n_layers - p.n_gpu_layers
    lines.append(f"KV {p.kv_dtype}: {_mib(p.trunk.kv)} (trunk, {p.n_gpu_layers} layers); "
                 f"KV fp32: {_mib(p.host.kv)} (host, {n_tail} layers)")
    if p.kv_spec and p.kv_spec != p.kv_dtype:       # per-layer / per-K/V formats as planned
        lines.append(f"KV per layer: {p.kv_spec}")
    kinds = p.kv_by_kind()
    if "swa" in kinds:
        for kind, name in (("global", "global layers"), ("swa", "sliding-window layers")):
            if kind in kinds:
                k = kinds[kind]
                rows = "/".join(str(r) for r in k["rows"])
                lines.append(f"KV {name}: {k['layers']} x {rows} rows = {_mib(k['bytes'])}")
    h = p.host_ram
    lines.append(f"host RAM: needs {_gib(h.need)} (weights {_gib(h.weights)}, routed experts {_gib(h.experts)}, "
                 f"KV {_gib(h.kv)}, scratch {_gib(h.scratch)}, trunk on CPU {_gib(h.trunk)}, headroom "
                 f"{_gib(h.headroom)}) of {_gib(h.available)} available ({h.source})"
                 + (f" + {_gib(h.held)} taken over" if h.held else "")
                 + f": {'fits' if h.fits else 'DOES NOT FIT'}; page cache of the file {_gib(h.page_cache)} (reclaimable)")
    if spec is not None:
        lines += format_reads(p, spec, depths)
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registry name or .gguf path (only metadata is read)")
    parser.add_argument("--kv-dtype", default="fp32", help=f"KV dtype of trunk layers ({', '.join(KV_FORMATS)}), or a KV spec "
                        "(engine.kv_spec: k-q8_0.v-bf16, q8_0.fp32@0,23)")
    parser.add_argument("--ctx", type=int, default=4096, help="context length to price the KV for")
    parser.add_argument("--vram-budget", default=None, help="trunk budget, e.g. 12GiB (default: free memory)")
    parser.add_argument("--n-gpu-layers", type=int, default=None, help="pin the trunk layer count")
    parser.add_argument("--wave-budget", default=str(DEFAULT_WAVE_BUDGET),
                        help="attention wave scratch, e.g. 256MiB")
    parser.add_argument("--reserve", default=str(DEFAULT_RESERVE), help="trunk headroom, e.g. 256MiB")
    parser.add_argument("--weight-format", default="auto",
                        help=f"stored weight format ({', '.join(WEIGHT_FORMAT_CHOICES)}; auto: f32 when it "
                             "needs at most half the available host RAM, else bf16)")
    parser.add_argument("--host-ram", default=None,
                        help="host RAM to plan against, e.g. 24GiB (default: MemAvailable / cgroup limit)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--expert-blocks", default=None, choices=("q4_0", "q8_0"),
                        help="price routed experts kept in these GGUF blocks (what --expert-format blocks "
                             "keeps from the file): every layer on the trunk, no expert cache")
    parser.add_argument("--cpu-moe", default=None, help="with --expert-blocks: auto or the first N MoE layers' "
                        "experts on the host CPU (llama.cpp's --n-cpu-moe)")
    parser.add_argument("--host-experts", default="cpu", choices=("cpu", "pcie", "dma"),
                        help="those experts computed by the host's CPU, or read in place by the GPU over PCIe")


def _cpu_moe(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        from .errors import ConfigError
        raise ConfigError(f"--cpu-moe {text!r} is not auto or a count", "pass auto or an integer >= 0") from None


def main(args: argparse.Namespace) -> int:
    from .models import file_bytes, spec_for
    from .settings import parse_size
    try:
        budget = None if args.vram_budget is None else parse_size(args.vram_budget, "--vram-budget")
        host = None if args.host_ram is None else parse_size(args.host_ram, "--host-ram")
        spec = spec_for(args.model)          # a bad file fails here, before torch and the kernels load
        from .planner import decode_read_bytes, plan, require_host_fit
        p = plan(spec, kv_dtype=args.kv_dtype, ctx=args.ctx, vram_budget=budget,
                 n_gpu_layers=args.n_gpu_layers, wave_budget_bytes=parse_size(args.wave_budget, "--wave-budget"),
                 weight_format=args.weight_format, reserve_bytes=parse_size(args.reserve, "--reserve"),
                 device=args.device, host_ram=host or None, file_bytes=file_bytes(args.model),
                 expert_blocks=args.expert_blocks, cpu_moe=_cpu_moe(args.cpu_moe), host_experts=args.host_experts)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    depths = (0, args.ctx)
    if args.json:
        print(json.dumps({**p.to_dict(), "decode_reads": [decode_read_bytes(p, spec, d) for d in depths]}, indent=2))
    else:
        print(format_plan(p, spec, depths))
    try:
        require_host_fit(p)
    except OutOfMemoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
