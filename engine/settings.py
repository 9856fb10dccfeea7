"""Settings: every ``KVBENCH_*`` environment variable, declared, validated and read in one place.

Contract: ``SETTINGS`` declares each variable once (name, kind, default, allowed values or
range, whether it can change logits: ``numerics``, and what it does). ``get(name)`` returns
the parsed value (the default when unset), each distinct value parsed once; a malformed value is a ``ConfigError`` naming the variable, the value
and what is allowed (the CLIs print it as ``error: ...``, exit 2, also for ``--help``).
``validate()`` parses every variable that is set, so a run fails before it starts, not half
way. ``snapshot()`` is what a results manifest records: every declared variable with its
value, whether it is set (non-default) and whether it changes numerics; ``numerics_changes(a,
b)`` lists the numerics-changing settings on which two snapshots differ (``harness compare``
refuses those runs unless told to). Reading a ``KVBENCH_*`` variable that is not declared
here is a bug (``get`` raises ``KeyError``).

    from engine import settings
    settings.get("KVBENCH_ATTN_BACKEND")      # "auto"
    settings.snapshot()["KVBENCH_ATTN_BACKEND"]  # {"value": "auto", "set": False, "numerics": True}
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str                           # "str" | "int" | "bool" | "size" | "path" | "choice" | "fault" | "tiles"
    default: Any
    help: str
    numerics: bool = False              # can change logits / tokens (compare refuses mixing them)
    choices: tuple[str, ...] = ()
    lo: int | None = None
    hi: int | None = None


def _s(*args, **kw) -> Setting:
    return Setting(*args, **kw)


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    _s("KVBENCH_NVCC", "path", None, "nvcc that builds the CUDA C++ kernels (q8_impl cuda_mma; default: nvcc on PATH, "
       "then $CUDA_HOME/bin, then /usr/local/cuda/bin)"),
    _s("KVBENCH_CACHE", "path", None, "model cache directory (default ~/.cache/kvbench/models)"),
    _s("KVBENCH_MODELS_DIR", "path", None, "directory of user-provided GGUFs (coder30b, olmoe)"),
    _s("KVBENCH_HOST_RAM", "size", None, "host RAM the planner may use, e.g. 24GiB (default: "
       "MemAvailable / cgroup limit)"),
    _s("KVBENCH_FAULT", "fault", None, "plant a known bug (harness self-tests)", numerics=True),
    _s("KVBENCH_ATTN_BACKEND", "choice", "auto", "attention kernels: auto (Triton on CUDA), torch, triton",
       numerics=True, choices=("auto", "torch", "triton")),
    _s("KVBENCH_ATTN_PRECISION", "choice", "tf32x3", "float32 dot products in the Triton kernels",
       numerics=True, choices=("tf32x3", "ieee", "tf32")),
    _s("KVBENCH_PREFILL_BF16_FLASH", "bool", False, "bf16 caches prefill through torch's flash attention "
       "(faster, rounds q and p to bf16)", numerics=True),
    _s("KVBENCH_PREFILL_BLOCK_M", "int", 64, "prefill kernel query tile", numerics=True, lo=16, hi=256),
    _s("KVBENCH_PREFILL_BLOCK_N", "int", 64, "prefill kernel key tile", numerics=True, lo=16, hi=256),
    _s("KVBENCH_PREFILL_WARPS", "int", 4, "prefill kernel warps", lo=1, hi=32),
    _s("KVBENCH_DECODE_MODE", "choice", "auto", "single-token steps: auto, eager, static, cuda_graph",
       numerics=True, choices=("auto", "eager", "static", "cuda_graph")),
    _s("KVBENCH_DECODE_COMPILE", "bool", True, "torch.compile the maths around attention in the "
       "captured decode step", numerics=True),
    _s("KVBENCH_DECODE_BLOCK_N", "int", None, "decode kernel key tile (default: per format)",
       numerics=True, lo=16, hi=1024),
    _s("KVBENCH_DECODE_PROGRAMS_PER_SM", "int", None, "decode kernel context splits per SM "
       "(default: per format)", numerics=True, lo=1, hi=64),
    _s("KVBENCH_DECODE_WARPS", "int", None, "decode kernel warps (default: per format)", lo=1, hi=32),
    _s("KVBENCH_DECODE_STAGES", "int", None, "decode kernel pipeline stages (default: per format)", lo=1, hi=8),
    _s("KVBENCH_DECODE_Q8_KERNEL", "bool", True, "q8_0 decode through its own kernel (0: the generic "
       "kernel)", numerics=True),
    _s("KVBENCH_DECODE_Q8_IMPL", "choice", "auto", "q8_0's own decode kernel: auto (cuda_mma where it runs as "
       "configured: a compiled CUDA device of compute capability 8.0+, nvcc found, 64-key tiles on 4 warps, none of the rows "
       "kernel's options asked; else rows; the launch record says which and why), rows (2-D float16 dots "
       "over block rows), batched (per-block 3-D dots) or blocks (one 2-D dot a 32-value block; "
       "head_dim 32, 64, 128) or streams (float32 FMAs, no tensor cores: R softmax streams a program, up to 8 query "
       "heads a KV head; streams2: the same in two passes, K then V, scores through a scratch) or cuda_mma (a CUDA C++ "
       "kernel, mma.sync tensor-core dots over cp.async tiles, built with nvcc on first use)", numerics=True,
       choices=("auto", "rows", "batched", "blocks", "streams", "streams2", "cuda_mma")),
    _s("KVBENCH_DECODE_Q8_TILES", "tiles", None, "the decode launch over q8_0 K and V (q8_0's own kernel, or the "
       "generic one where that serves), block_n,programs_per_sm,num_warps,num_stages (e.g. 32,6,2,2 or 32x6x2x2), "
       "for q8_0 K and V only where KVBENCH_DECODE_BLOCK_N and its "
       "siblings set every format's: a variant that changes q8_0's tiles leaves bf16's as they are "
       "(default: per format and head_dim)", numerics=True),
    _s("KVBENCH_DECODE_Q8_WORDS", "choice", "none", "the q8_0 rows kernel reads K, V or both as int16 "
       "words and turns them into float16 where they land (k, v, kv), instead of int8 tiles that reach "
       "the dots through a byte gather (none): the same float16 values; sm_90 SASS of the main loop "
       "106.6 -> 86.4 instructions a key with kv, 75.4 with kv_prmt (kv, the bytes unpacked by PTX byte "
       "permutes; compiled only) (reports/cpu-2026-12-06c), not yet timed on a GPU",
       numerics=True, choices=("none", "k", "v", "kv", "kv_prmt")),
    _s("KVBENCH_DECODE_Q8_VNORM", "choice", "split", "the q8_0 rows kernel's power-of-two normalisation of "
       "p * dv before its float16 split: tile (from each tile's largest V scale, a reduction in the loop) "
       "or split (from the split's largest, found once before the loop)", numerics=True,
       choices=("tile", "split")),
    _s("KVBENCH_DECODE_BF16_STACK", "choice", "auto", "decode over bf16 K and V with the three bf16 terms of q "
       "and of p stacked along the rows of one dot operand (one dot for the scores, one for the values) "
       "instead of three dots each: auto (where that operand is 16 rows, up to 4 query heads a KV head, "
       "no sliding window), 1 (every full-context launch), 0 (never)", numerics=True, choices=("auto", "0", "1")),
    _s("KVBENCH_DECODE_Q8_PACK", "choice", "auto", "q8_0's cuda_mma kernel with each query head's two float16 "
       "terms in the mma's columns (one mma a k-step instead of two): auto (where it applies: cuda_mma at up to 4 "
       "query heads a KV head and 3 stages; 3% faster at the bench geometry, 16384 and 32768 keys, on the H100, "
       "reports/h100-2026-12-07h), 1 (asked: refused where it does not apply), 0 (never)", numerics=True,
       choices=("auto", "0", "1")),
    _s("KVBENCH_DECODE_Q8_SOFTMAX", "choice", "tile", "q8_0's cuda_mma kernel's softmax: tile (each tile's max "
       "over its 64 keys) or warp (each warp's 16 keys their own online-softmax stream, merged at the end: one "
       "barrier a tile fewer; at 3 / 4 / 8 query heads a KV head with head_dim 64 / 128 / 128, 3 stages; "
       "unmeasured, refused elsewhere)", numerics=True, choices=("tile", "warp")),
    _s("KVBENCH_DECODE_Q8_EARLY", "choice", "auto", "q8_0's cuda_mma kernel under programmatic dependent "
       "launch (KVBENCH_DECODE_PDL=1): auto / 1 issue the first tiles' loads of the cache rows before the newest "
       "key before waiting for the kernel ahead (the decode step's K/V append, which writes that key only), so "
       "they overlap it; 0 waits first; 1 is refused where the launch is not cuda_mma under PDL (unmeasured)",
       choices=("auto", "0", "1")),
    _s("KVBENCH_DECODE_Q8_STACK", "bool", False, "the q8_0 rows kernel with the two float16 terms of q and of "
       "p * dv stacked along the rows of one dot operand (one dot for the scores, one for the values, a stacked "
       "accumulator) instead of two dots each; needs two terms a side and the split normalisation. Measured on "
       "the H100 at coder30b's geometry: level or slower at ctx 4096 and 16384, 2% faster at 32768 "
       "(reports/h100-2026-12-07c), so off by default", numerics=True),
    _s("KVBENCH_DECODE_FUSE", "bool", False, "decode combine fused into the last split program",
       numerics=True),
    _s("KVBENCH_DECODE_PDL", "bool", False, "decode attention's split kernel and combine launched with "
       "programmatic dependent launch (sm_90+): each waits for the kernel before it inside the kernel, so "
       "its launch overlaps that kernel's tail; compiled launches with the separate combine only"),
    _s("KVBENCH_STEP_PDL", "choice", "auto", "every Triton kernel of the decode step (GEMVs, RoPE + append, "
       "routing, MoE experts, KV append, decode attention) launched with programmatic dependent launch, "
       "each waiting for the kernel before it inside the kernel: auto (on for compiled kernels on sm_90 and "
       "newer; H200, captured coder30b step: +3.2-7.7% tok/s in one call, +4.7-5.1% in another but bf16 KV at 16384 level, reports/h200-2026-12-06), 1 (on; refused where it "
       "cannot run), 0 (off)", choices=("auto", "0", "1")),
    _s("KVBENCH_DECODE_COMBINE_BLOCK", "int", 128, "splits the decode combine reads per step of its "
       "loop (a power of two; up to the split count). 128 from the H200 (reports/h200-2026-12-04g): "
       "the SmolLM2 step's combine 115 -> 67 us at depth 4096 against 32", lo=1, hi=1024),
    _s("KVBENCH_DECODE_FUSED_QKV", "bool", True, "q/k/v weights of a layer in one [q+2kv, d] buffer "
       "(wq/wk/wv are row views of it, same bytes) read by one matmul per layer", numerics=True),
    _s("KVBENCH_DECODE_FUSED_GATE_UP", "bool", True, "a dense FFN's gate/up weights in one [2ff, d] "
       "buffer (w_gate/w_up are row views of it, same bytes) read by one matmul per decode step",
       numerics=True),
    _s("KVBENCH_DECODE_FUSED_GEMV", "bool", True, "the captured decode step's projections through "
       "engine.kernels.gemv where Triton runs (f32/bf16 weights, fused q/k/v): RMS norm, activation and "
       "residual add fused into the matrix-vector launches", numerics=True),
    _s("KVBENCH_DECODE_ROWS", "bool", True, "a decode step off Triton (the CPU) attends through "
       "engine.kernels.prefill_attention.decode_rows_ref (its one query row over the filled cache rows) "
       "instead of the blocked reference's 128-row padded chunk: same maths, O(position) work",
       numerics=True),
    _s("KVBENCH_GEMV_BLOCK_N", "int", None, "engine.kernels.gemv output rows per program (default: "
       "by the row count)", lo=1, hi=64),
    _s("KVBENCH_GEMV_BLOCK_K", "int", None, "engine.kernels.gemv columns per unrolled step (default: "
       "512)", lo=16, hi=4096),
    _s("KVBENCH_GEMV_Q8_FORM", "choice", "blocks", "engine.kernels.gemv over Q8_0 rows: blocks (a "
       "32-value block's products summed, then times its one scale) or gather (each value times its "
       "block's scale, loaded per value); the same values, summed in another order",
       choices=("blocks", "gather")),
    _s("KVBENCH_MOE_BLOCKS_FORM", "choice", "auto", "engine.kernels.moe_blocks' sums: blocks (a "
       "32-value block's products summed, then times its one scale) or gather (each value times its "
       "block's scale, loaded per value); the same values, summed in another order; auto: each "
       "launch's measured default (moe_blocks.CONFIG: blocks on the GPU, gather interpreted) or its "
       "part's KVBENCH_MOE_BLOCKS_GU_SUMS / KVBENCH_MOE_BLOCKS_DOWN_SUMS",
       choices=("auto", "blocks", "gather")),
    _s("KVBENCH_MOE_UNROLL", "bool", True, "engine.kernels.moe's loops unrolled at compile time "
       "(every weight load of a program in flight together)"),
    _s("KVBENCH_MOE_BLOCKS_GU_BLOCK_F", "int", None, "engine.kernels.moe_blocks gate/up rows per program "
       "(default 8 on the GPU, 16 interpreted)", lo=1, hi=256),
    _s("KVBENCH_MOE_BLOCKS_GU_BLOCK_K", "int", None, "engine.kernels.moe_blocks gate/up values of d per "
       "step (a power of two >= 32; default 512 on the GPU, 256 interpreted)", lo=32, hi=4096),
    _s("KVBENCH_MOE_BLOCKS_GU_WARPS", "int", None, "engine.kernels.moe_blocks gate/up warps (default 2 on the GPU, 4 interpreted)",
       lo=1, hi=32),
    _s("KVBENCH_MOE_BLOCKS_DOWN_BLOCK_D", "int", None, "engine.kernels.moe_blocks down output rows per "
       "program (default 4 on the GPU, 16 interpreted)", lo=1, hi=256),
    _s("KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K", "int", None, "engine.kernels.moe_blocks down values of ff per "
       "step (a power of two >= 32; default 512 on the GPU, 256 interpreted)", lo=32, hi=4096),
    _s("KVBENCH_MOE_BLOCKS_DOWN_WARPS", "int", None, "engine.kernels.moe_blocks down warps (default 4)",
       lo=1, hi=32),
    _s("KVBENCH_MOE_BLOCKS_GU_SUMS", "bool", None, "engine.kernels.moe_blocks gate/up in the per-block "
       "sum form (1) or the per-value one (0); default 1 on the GPU, 0 interpreted; "
       "KVBENCH_MOE_BLOCKS_FORM, when not auto, sets both parts"),
    _s("KVBENCH_MOE_BLOCKS_DOWN_SUMS", "bool", None, "engine.kernels.moe_blocks down in the per-block "
       "sum form (1) or the per-value one (0); default 1 on the GPU, 0 interpreted; "
       "KVBENCH_MOE_BLOCKS_FORM, when not auto, sets both parts"),
    _s("KVBENCH_CPU_MOE_GPU_SHARE", "int", 0, "of the k experts a token chooses on a cpu-tier MoE layer "
       "(cpu_moe, host_experts=cpu), how many the GPU computes from the layer's pinned host blocks over "
       "PCIe, on a side stream, while the CPU computes the rest (one-token steps on CUDA; float32 block "
       "maths for the GPU's share); 0: the CPU computes all k", numerics=True, lo=0, hi=64),
    _s("KVBENCH_CPU_MOE_NATIVE", "bool", None, "cpu-tier MoE layers (cpu_moe, host_experts=cpu) compute "
       "one-token steps with engine.native (the layer's Q4_0 blocks read in place, integer dots against "
       "8-bit activation blocks, built with the machine's C compiler) instead of torch's int4 path; "
       "unset: native where the layer keeps its blocks and engine.native builds here with AVX2, torch's "
       "int4 path otherwise (cpu_expert_math names the one taken); 1 without a compiler: a step raises",
       numerics=True),
    _s("KVBENCH_HOST_NODES", "bool", True, "a captured decode step runs each cpu-tier MoE layer that "
       "computes through engine.native (no GPU share) as CUDA host nodes inside one graph (copy in, "
       "the native host function, copy back: no Python and no host sync between layers) instead of "
       "ending a graph at it; read when the decode path is set and the step built; layers that cannot "
       "stay graph boundaries, and decode_path_reason counts both. On by default since "
       "reports/h100-2026-12-06d (with the doorbell: 1.27-1.64x the tok/s of the graphs split at each layer); "
       "0 splits the step at every cpu-tier layer"),
    _s("KVBENCH_HOST_NODES_RUN", "choice", "doorbell", "who runs a captured step's host-node layers "
       "(KVBENCH_HOST_NODES): callback (CUDA host functions, on CUDA's callback thread and its own OpenMP "
       "team) or doorbell (the graph rings a page-locked flag at each layer and waits for the host "
       "thread's answer: the jobs run on the host thread's OpenMP team, no launch or driver wait between "
       "layers; engine.native.Doorbell)", choices=("callback", "doorbell")),
    _s("KVBENCH_STOP_COMPILE_WORKERS", "bool", True, "after a captured decode step with cpu-tier MoE "
       "layers is built, shut down torch.compile's pool of compile worker processes (one a core, started "
       "at the first compile): while they boot they take the cores the cpu tier's OpenMP team computes "
       "on, and its first steps stall (reports/h100-2026-12-06d: 400 ms steps for ~5 s); applied: "
       "StaticDecode.compile_workers_stopped; a later compile starts the pool again"),
    _s("KVBENCH_HOST_NODES_WAIT", "choice", "sleep", "how the host waits for a captured step with host "
       "nodes (KVBENCH_HOST_NODES): sleep (on a blocking CUDA event: the thread gives its core to the "
       "callback thread's OpenMP team, whose static schedule waits for its slowest thread) or spin (CUDA's "
       "default wait, which takes one of those cores: reports/h100-2026-12-06c)",
       choices=("sleep", "spin")),
    _s("KVBENCH_NATIVE_MARCH", "str", "native", "gcc -march for engine.native's build: native (this CPU's "
       "vector units) or e.g. x86-64 (the portable C path)"),
    _s("KVBENCH_DECODE_ROPE_APPEND", "bool", True, "the captured decode step rotates q/k (RoPE) and "
       "appends K/V in one Triton launch (kv_append.rope_append_at) on layers through the gemv kernel "
       "without q/k norms or with per-head ones (normed in the launch), instead of the compiled "
       "rotation and kv_append", numerics=True),
    _s("KVBENCH_DECODE_KV_PAIR", "bool", True, "the captured decode step appends K and V in one "
       "Triton launch (kv_append_pair: the same bytes as two)"),
    _s("KVBENCH_DECODE_ROUTE_KERNEL", "bool", True, "static decode routes MoE tokens with the Triton "
       "softmax/top-k kernel (engine.kernels.route) instead of torch.topk", numerics=True),
    _s("KVBENCH_DECODE_DEVICE_EMBED", "bool", True, "static decode gathers the embedding row on the "
       "device and feeds each step's argmax to the next on the device (generate reads tokens back "
       "in batches); untied models on CUDA keep a priced device copy of token_embd"),
    _s("KVBENCH_EMBED_MAPPED", "bool", True, "with MoE experts on the host (cpu_moe > 0), the static "
       "decode reads the token's embedding row from the page-locked host table over PCIe instead of "
       "a trunk copy (plan embed_tier 'mapped'), as llama.cpp keeps token_embd on the host: that "
       "VRAM holds experts"),
    _s("KVBENCH_SCRATCH_LEND", "bool", False, "a prefill on CUDA releases the plan's trunk scratch "
       "(scratch.wave, scratch.activations: buffers that hold the planned room) for its own transient "
       "tensors and takes it back after, so they reuse that memory instead of adding to it"),
    _s("KVBENCH_DECODE_READBACK", "int", 16, "static greedy decode reads tokens back every N steps "
       "(with KVBENCH_DECODE_DEVICE_EMBED)", lo=1, hi=4096),
    _s("KVBENCH_FUZZ_EXAMPLES", "int", 500, "GGUF fuzz cases in make test", lo=1),
]}

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": (1 << 20), "mib": (1 << 20), "mb": 10**6,
          "g": (1 << 30), "gib": (1 << 30), "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_size(text: str | int, what: str = "size") -> int:
    """'12GiB' / '12GB' / '500MiB' / '1.5G' (bare K/M/G/T are binary) / '4096' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what}: cannot read {text!r} as a size",
                          "write a byte count or a number with a unit, e.g. 12GiB, 12GB, 500MiB")
    return int(float(m.group(1)) * _UNITS[unit])



_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_cache: dict[str, Any] = {}


def _parse(s: Setting, raw: str) -> Any:
    raw = raw.strip()
    bad = lambda allowed: ConfigError(f"{s.name}={raw!r} is not {allowed}",   # noqa: E731
                                      f"set it to {allowed}, or unset it ({s.help})")
    if s.kind in ("str", "path"):
        if not raw:
            raise bad("a non-empty value")
        return raw
    if s.kind == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise bad("0 or 1")
    if s.kind == "int":
        try:
            v = int(raw)
        except ValueError:
            raise bad("an integer") from None
        if (s.lo is not None and v < s.lo) or (s.hi is not None and v > s.hi):
            raise bad(f"an integer in [{s.lo if s.lo is not None else '-inf'}, "
                      f"{s.hi if s.hi is not None else 'inf'}]")
        return v
    if s.kind == "choice":
        if raw.lower() not in s.choices:
            raise bad(f"one of {', '.join(s.choices)}")
        return raw.lower()
    if s.kind == "size":
        try:
            v = parse_size(raw, s.name)
        except ConfigError:
            raise bad("a size such as 24GiB") from None
        if v <= 0:
            raise bad("a positive size such as 24GiB")
        return v
    if s.kind == "fault":
        return _parse_fault(s, raw)
    if s.kind == "tiles":     # block_n,programs_per_sm,num_warps,num_stages
        allowed = "four integers block_n,programs_per_sm,num_warps,num_stages such as 32,6,2,2 or 32x6x2x2 " \
                  "(block_n a power of two in [16, 256], programs 1-64, warps 1, 2, 4 or 8, stages 1-8)"
        try:
            bn, pps, w, st = (int(x) for x in raw.lower().replace("x", ",").split(","))
        except ValueError:
            raise bad(allowed) from None
        if bn & (bn - 1) or not 16 <= bn <= 256 or not 1 <= pps <= 64 or w not in (1, 2, 4, 8) or not 1 <= st <= 8:
            raise bad(allowed)
        return {"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st}
    raise AssertionError(s.kind)


FAULTS: dict[str, Callable[[str], bool]] = {}    # fault name -> validator of its argument


def register_fault(name: str, takes_arg: bool = False, help: str = "") -> None:
    """Declare a plantable fault (``KVBENCH_FAULT=name`` or ``name:N``) where it is implemented."""
    FAULTS[name] = (lambda a: a.lstrip("-").isdigit()) if takes_arg else (lambda a: a == "")


def _parse_fault(s: Setting, raw: str) -> tuple[str, int | None]:
    name, _, arg = raw.partition(":")
    ok = FAULTS.get(name)
    if not raw or ok is None or not ok(arg.strip()):
        known = ", ".join(f"{n}:N" if not FAULTS[n]("") else n for n in sorted(FAULTS)) or "none"
        raise ConfigError(f"{s.name}={raw!r} is not a known fault", f"use one of {known}, or unset it")
    return name, (int(arg) if arg.strip() else None)


# where each fault is planted: engine/kv.py (the trunk ignores the requested KV dtype, on every
# layer or one), engine/planner.py (KV priced at fp32 whatever the dtype: the seed's planner bug),
# harness/adapters/llamacpp.py (llama.cpp keeps its default f16 KV whatever the request),
# engine/kernels (torch references and Triton kernels alike): prefill_attention.py + kv.py
# (wave_mask_off_by_one: waves after a prefill's first see one key past their position),
# kv_append.py (q8_scale_bf16: q8_0 block scales rounded to bfloat16 before stored as fp16;
# q8_scale_shift: each q8_0 block stored with the scale of the block before it in its row)
for _name, _arg in (("ignore_kv_dtype", False), ("skip_narrow_layer", True), ("kv_priced_fp32", False),
                    ("llamacpp_keep_f16", False), ("wave_mask_off_by_one", False), ("q8_scale_bf16", False),
                    ("q8_scale_shift", False)):
    register_fault(_name, _arg)


def get(name: str) -> Any:
    """The parsed value of ``name`` (its default when unset); ConfigError when malformed."""
    s = SETTINGS[name]
    raw = os.environ.get(name)
    key = (name, raw)
    if key not in _cache:
        _cache[key] = s.default if raw is None or not raw.strip() else _parse(s, raw)
    return _cache[key]


def overrides(keys: dict[str, str]) -> dict[str, Any]:
    """{field: parsed value} for each ``keys`` entry (field -> variable) whose variable is set in
    the environment now. For tunables a module reads into a dict at import: merged at each call,
    a variable a benchmark variant sets after import is applied instead of silently ignored."""
    return {field: get(name) for field, name in keys.items() if (os.environ.get(name) or "").strip()}


def validate() -> None:
    """Parse every declared variable that is set (raises on the first malformed one), and
    refuse an unknown ``KVBENCH_*`` variable (a typo would otherwise be ignored)."""
    import difflib
    for key in sorted(os.environ):
        if key.startswith("KVBENCH_") and key not in SETTINGS and key not in WORKFLOW_VARIABLES:
            close = difflib.get_close_matches(key, list(SETTINGS), n=1)
            raise ConfigError(f"{key} is not a kvbench setting" + (f"; did you mean {close[0]}?" if close else ""),
                              "unset it (engine/settings.py declares every setting)")
    for name in SETTINGS:
        get(name)


# read by CI workflows, not by the engine or harness
WORKFLOW_VARIABLES = {"KVBENCH_PR_GPU", "KVBENCH_PR_FAIL_ON_REGRESSION", "KVBENCH_GPU_LABELS"}


def snapshot() -> dict[str, dict]:
    """Every declared setting: ``{"value", "set", "numerics"}`` (JSON-able)."""
    out = {}
    for name, s in SETTINGS.items():
        v = get(name)
        if isinstance(v, tuple):
            v = f"{v[0]}:{v[1]}" if v[1] is not None else v[0]
        out[name] = {"value": v, "set": os.environ.get(name, "").strip() != "", "numerics": s.numerics}
    return out


def non_default(snap: dict[str, dict]) -> dict[str, Any]:
    return {k: v["value"] for k, v in snap.items() if v.get("set")}


def numerics_changes(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Numerics-changing settings whose values differ between two snapshots, as lines."""
    out = []
    for name in sorted(set(a) | set(b)):
        s = SETTINGS.get(name)
        numerics = s.numerics if s else (a.get(name) or b.get(name) or {}).get("numerics", True)
        va, vb = (a.get(name) or {}).get("value"), (b.get(name) or {}).get("value")
        if numerics and va != vb:
            out.append(f"{name}: {va!r} vs {vb!r}")
    return out


def describe() -> str:
    """One line per setting: name, value, default, what it does (``python -m engine settings``)."""
    lines = []
    for name, s in SETTINGS.items():
        v = get(name)
        mark = "*" if os.environ.get(name, "").strip() else " "
        lines.append(f"{mark} {name} = {v!r} (default {s.default!r}{', changes numerics' if s.numerics else ''}): "
                     f"{s.help}")
    return "\n".join(lines)
