"""One-token MoE FFN: the k routed experts' SiLU-gated FFNs read in place from stacked weights.

Contract: ``moe_decode(x, gate, up, down, ids, weights, table=None, residual=None)`` returns
``residual + sum_j weights[j] * down[s_j] @ (silu(gate[s_j] @ x) * (up[s_j] @ x))`` as
float32 [1, d] for one token ``x`` [1, d], where ``gate``/``up`` are [S, ff, d] and
``down`` [S, d, ff] stacks (an expert cache's slot buffers, or a layer's resident experts)
in any float dtype, ``ids`` [k] integer and ``weights`` [k] float device tensors, and
``s_j = table[ids[j]]`` when a ``table`` [E] (expert -> slot) is given, else ``s_j = ids[j]``.
Only the k selected rows are read, straight from the stacks (no gathered copy); expert and
slot ids are read on the device, so the launch is the same for every token (no host sync:
a CUDA graph can capture it). Two launches: gate/up/SiLU into a [k, ff] float32 scratch,
then down, the weighted sum over the k experts and the residual. Every
product accumulates in float32 from the stored dtype. ``KVBENCH_MOE_UNROLL`` (default on)
unrolls both kernels' loops at compile time (d, ff and k become compile-time constants: one
compilation per model geometry). ``moe_decode_ref`` is the plain torch
ground truth (float32 maths, a loop over the k experts); ``CONFIG`` holds the tile sizes
(``_tiles``: wider under the interpreter).

    y = moe_decode(h, cache_gate, cache_up, cache_down, top_e, top_p, table=slot_of_expert)
    x = moe_decode(h, w.gate, w.up, w.down, top_e, top_p, residual=x)   # x + MoE(h)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import interpreted
from .common import pdl_enter, pdl_launch

# Tile sizes (benchmarks/bench_moe_decode.py sweeps them on the GPU). gate_up: BLOCK_F rows
# of gate and up per program, BLOCK_D columns per step; down: BLOCK_D output rows per
# program, BLOCK_F columns per step.
CONFIG = {"gate_up": {"BLOCK_F": 16, "BLOCK_D": 256, "num_warps": 4},
          "down": {"BLOCK_D": 8, "BLOCK_F": 256, "num_warps": 4}}


# --- Triton kernels -------------------------------------------------------------------------
@triton.jit
def _expert_row(IDS, TABLE, j, USE_TABLE: tl.constexpr):
    # the stack row holding the j-th selected expert, as int64 (S * ff * d passes 2^31)
    e = tl.load(IDS + j)
    if USE_TABLE:
        e = tl.load(TABLE + e)
    return e.to(tl.int64)


@triton.jit
def _gate_up_step(X, g_rows, u_rows, mask_f, d0, acc_g, acc_u, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(X + offs_d, mask=mask_d, other=0.0).to(tl.float32)              # [BLOCK_D]
    m = mask_f[:, None] & mask_d[None, :]
    g = tl.load(g_rows + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_rows + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    return acc_g + g * x[None, :], acc_u + u * x[None, :]


@triton.jit
def _moe_gate_up_kernel(X, G, U, IDS, TABLE, H,
                        D: tl.constexpr, FF,
                        stride_ge, stride_gf, stride_ue, stride_uf, stride_hk,
                        USE_TABLE: tl.constexpr, UNROLL: tl.constexpr,
                        BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (k, cdiv(FF, BLOCK_F)); H[j, f] = silu(gate[s_j, f] . x) * (up[s_j, f] . x).
    # UNROLL: the D loop unrolled at compile time, so a program's loads are all in flight
    # together (a decode GEMV waits on memory latency, not bandwidth, when they go one by one)
    j = tl.program_id(0)
    s = _expert_row(IDS, TABLE, j, USE_TABLE)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < FF
    g_rows = G + s * stride_ge + offs_f[:, None].to(tl.int64) * stride_gf      # [BLOCK_F, 1]
    u_rows = U + s * stride_ue + offs_f[:, None].to(tl.int64) * stride_uf
    acc_g = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    if UNROLL:
        for d0 in tl.static_range(0, D, BLOCK_D):
            acc_g, acc_u = _gate_up_step(X, g_rows, u_rows, mask_f, d0, acc_g, acc_u, D, BLOCK_D)
    else:
        for d0 in range(0, D, BLOCK_D):
            acc_g, acc_u = _gate_up_step(X, g_rows, u_rows, mask_f, d0, acc_g, acc_u, D, BLOCK_D)
    a = tl.sum(acc_g, axis=1)
    b = tl.sum(acc_u, axis=1)
    h = a / (1.0 + tl.exp(-a)) * b
    tl.store(H + j * stride_hk + offs_f, h, mask=mask_f)


@triton.jit
def _down_step(H, W, IDS, TABLE, P, row_off, mask_d, t, acc, stride_we, stride_hk,
               FF: tl.constexpr, USE_TABLE: tl.constexpr, BLOCK_F: tl.constexpr):
    n_f: tl.constexpr = (FF + BLOCK_F - 1) // BLOCK_F
    j = t // n_f
    offs_f = (t % n_f) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < FF
    s = _expert_row(IDS, TABLE, j, USE_TABLE)
    p = tl.load(P + j).to(tl.float32)
    h = tl.load(H + j * stride_hk + offs_f, mask=mask_f, other=0.0) * p         # [BLOCK_F] f32
    w = tl.load(W + s * stride_we + row_off + offs_f[None, :], mask=mask_d[:, None] & mask_f[None, :], other=0.0)
    return acc + w.to(tl.float32) * h[None, :]


@triton.jit
def _moe_down_kernel(H, W, IDS, TABLE, P, R, OUT,
                     D, FF: tl.constexpr, K: tl.constexpr,
                     stride_we, stride_wd, stride_hk,
                     USE_TABLE: tl.constexpr, HAS_RES: tl.constexpr, UNROLL: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (cdiv(D, BLOCK_D),); OUT[r] = R[r] + sum_j P[j] * (down[s_j, r] . H[j]). One flat
    # loop over (expert, column block) pairs, so the loads pipeline across experts too
    # (UNROLL: unrolled at compile time, every load of the program in flight together).
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row_off = offs_d[:, None].to(tl.int64) * stride_wd                        # [BLOCK_D, 1]
    n_f: tl.constexpr = (FF + BLOCK_F - 1) // BLOCK_F
    acc = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
    if UNROLL:
        for t in tl.static_range(0, K * n_f):
            acc = _down_step(H, W, IDS, TABLE, P, row_off, mask_d, t, acc, stride_we, stride_hk,
                             FF, USE_TABLE, BLOCK_F)
    else:
        for t in range(0, K * n_f):
            acc = _down_step(H, W, IDS, TABLE, P, row_off, mask_d, t, acc, stride_we, stride_hk,
                             FF, USE_TABLE, BLOCK_F)
    y = tl.sum(acc, axis=1)
    if HAS_RES:
        y += tl.load(R + offs_d, mask=mask_d, other=0.0)
    tl.store(OUT + offs_d, y, mask=mask_d)


# --- launch wrapper -------------------------------------------------------------------------
def _tiles(d: int, ff: int) -> tuple[dict, dict]:
    """(gate_up, down) tiles: ``CONFIG``'s, or under the interpreter (which runs programs one by
    one, each paying a fixed cost per op) few wide programs: a whole expert's rows of up to 128 x
    256 a gate/up program, up to 256 x 256 a down program (partial tiles still masked)."""
    if not interpreted():
        return CONFIG["gate_up"], CONFIG["down"]
    bd, bf = min(256, triton.next_power_of_2(d)), min(256, triton.next_power_of_2(ff))
    return ({"BLOCK_F": min(128, bf), "BLOCK_D": bd, "num_warps": 4},
            {"BLOCK_D": bd, "BLOCK_F": bf, "num_warps": 4})


def check_stacks_and_route(op, x, gate, up, down, ids, weights, table, residual):
    """The arguments every one-token MoE launch shares (``op`` names the caller in errors):
    stacks [S, ff, d], [S, ff, d], [S, d, ff] (anything with a ``shape``), one token, [k] ids
    and weights, an [E] table, a [1, d] residual."""
    S, ff, d = gate.shape
    if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (S, d, ff):
        raise ValueError(f"{op}: gate {tuple(gate.shape)}, up {tuple(up.shape)}, down "
                         f"{tuple(down.shape)} are not [S, ff, d], [S, ff, d], [S, d, ff]")
    if x.shape != (1, d):
        raise ValueError(f"{op}: x {tuple(x.shape)} must be one token [1, {d}]")
    if ids.dim() != 1 or weights.shape != ids.shape:
        raise ValueError(f"{op}: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be [k]")
    if residual is not None and residual.shape != (1, d):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} must be [1, {d}]")
    if table is not None and table.dim() != 1:
        raise ValueError(f"{op}: table {tuple(table.shape)} must be [E]")


def _check(x, gate, up, down, ids, weights, table, residual):
    check_stacks_and_route("moe_decode", x, gate, up, down, ids, weights, table, residual)
    for name, t in (("gate", gate), ("up", up), ("down", down)):
        if t.stride(-1) != 1:
            raise ValueError(f"moe_decode: {name} rows must be contiguous (stride {t.stride()})")


def moe_decode(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launch (interpreted on CPU); see the module docstring. Returns float32 [1, d]."""
    _check(x, gate, up, down, ids, weights, table, residual)
    S, ff, d = gate.shape
    k = ids.shape[0]
    x1 = x.reshape(d).to(torch.float32).contiguous()
    ids = ids.contiguous()
    p = weights.to(torch.float32).contiguous()
    tab = ids if table is None else table.contiguous()
    res = None if residual is None else residual.reshape(d).to(torch.float32).contiguous()
    h = torch.empty(k, ff, dtype=torch.float32, device=x.device)              # [k, ff] scratch
    out = torch.empty(1, d, dtype=torch.float32, device=x.device)
    cu, cd = _tiles(d, ff)
    from .. import settings
    unroll = bool(settings.get("KVBENCH_MOE_UNROLL"))
    _moe_gate_up_kernel[(k, triton.cdiv(ff, cu["BLOCK_F"]))](
        x1, gate, up, ids, tab, h, d, ff,
        gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), h.stride(0),
        USE_TABLE=table is not None, UNROLL=unroll,
        BLOCK_F=cu["BLOCK_F"], BLOCK_D=cu["BLOCK_D"], num_warps=cu["num_warps"], **pdl_launch())
    _moe_down_kernel[(triton.cdiv(d, cd["BLOCK_D"]),)](
        h, down, ids, tab, p, x1 if res is None else res, out, d, ff, k,
        down.stride(0), down.stride(1), h.stride(0),
        USE_TABLE=table is not None, HAS_RES=res is not None, UNROLL=unroll,
        BLOCK_D=cd["BLOCK_D"], BLOCK_F=cd["BLOCK_F"], num_warps=cd["num_warps"], **pdl_launch())
    return out


# --- torch reference ------------------------------------------------------------------------
def moe_decode_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: float32 maths, one expert at a time (reads host ints: not for graphs)."""
    _check(x, gate, up, down, ids, weights, table, residual)
    rows = (table[ids] if table is not None else ids).tolist()
    h = x.reshape(1, -1).float()
    y = torch.zeros_like(h) if residual is None else residual.reshape(1, -1).float().clone()
    for s, p in zip(rows, weights.float().tolist()):
        a, b = h @ gate[s].float().T, h @ up[s].float().T            # [1, ff]
        y = y + p * ((F.silu(a) * b) @ down[s].float().T)            # [1, d]
    return y
