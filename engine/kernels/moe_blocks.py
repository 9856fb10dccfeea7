"""One-token MoE FFN over routed experts kept in their GGUF block format (Q4_0, Q8_0).

Contract: a ``BlockStack`` is a stack [S, N, K] of ggml blocks (32 values along K) held as
two aligned arrays instead of ggml's interleaved 18- or 34-byte blocks:
- ``q4_0``: ``qs`` uint8 [S, N, K/2]; byte ``16 b + j`` of a row holds value ``32 b + j``
  in its low nibble and ``32 b + 16 + j`` in its high nibble (ggml's order inside a block);
  a value is ``d * (nibble - 8)``.
- ``q8_0``: ``qs`` int8 [S, N, K]; a value is ``d * q``.
- ``d`` float16 [S, N, K/32]: one scale per block.
``BlockStack.from_ggml(raw, fmt, shape)`` splits a tensor's GGUF bytes (row-major blocks) and
``to_ggml()`` puts them back byte for byte; ``dequantize()`` / ``rows(s)`` give float32.
Q4_0 takes 0.5625 bytes a value, Q8_0 1.0625, against 2 for bf16: the planner prices
experts kept this way at their block bytes (``nbytes``).

``moe_decode_blocks(x, gate, up, down, ids, weights, table=None, residual=None)`` computes
what ``engine.kernels.moe.moe_decode`` does, ``residual + sum_j weights[j] * down[s_j] @
(silu(gate[s_j] @ x) * (up[s_j] @ x))`` as float32 [1, d], reading the k selected experts'
blocks in place and dequantising them in registers (float32 maths from the exact block
values: the only difference from the float kernel over dequantised stacks is summation
order). Expert and slot ids are read on the device (no host sync; a CUDA graph can capture
it). ``moe_decode_blocks_ref`` is the plain torch ground truth over ``dequantize()``; tests
check ``dequantize`` itself against ``gguf.quants``.

It is two launches, each callable alone (``gate_up_launch``, ``down_launch``: what
benchmarks/bench_moe_blocks.py times): tiles and sum form come from ``launch_config`` at each
launch (``CONFIG`` on the GPU, measured; ``HOST_CONFIG`` for stacks the GPU reads from pinned
host memory, measured over PCIe; ``INTERPRETED_CONFIG`` under the interpreter; the tile settings
(``_TUNABLES``) over any of them). The form (each config's ``SUMS``, or a part's
``_SUMS`` setting, ``KVBENCH_MOE_BLOCKS_FORM`` over both): "gather" multiplies each value by its
block's scale, "blocks" sums a block's 32 products first and multiplies once. Inside
``recording()`` every launch's applied configuration is logged
(``StaticDecode.moe_launches``), so what a decode step ran is observable.

    gate = BlockStack.from_ggml(raw_gate, "q4_0", (E, ff, d))
    y = moe_decode_blocks(h, gate, up, down, top_e, top_p, residual=x)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ..formats import Q8_BLOCK
from . import LaunchLog
from .common import pdl_enter, pdl_launch
from .moe import _expert_row, check_stacks_and_route, moe_decode_ref  # shared with the float kernel

# bits a value and ggml bytes a block, from the gguf package's table of ggml's block types
FORMATS = {name: (bits, GGML_QUANT_SIZES[qt][1]) for name, bits, qt in (("q4_0", 4, QT.Q4_0), ("q8_0", 8, QT.Q8_0))}
BLOCK = GGML_QUANT_SIZES[QT.Q4_0][0]        # values a block (32; Q8_0's too: engine.formats.Q8_BLOCK)
assert GGML_QUANT_SIZES[QT.Q8_0][0] == BLOCK == Q8_BLOCK

# Tile sizes: gate_up: BLOCK_F rows of gate and up per program, BLOCK_K values of d per step;
# down: BLOCK_D output rows per program, BLOCK_K values of ff per step (multiples of 32).
# SUMS: the form, True = "blocks" (a block's 32 products summed, then times its scale), False =
# "gather" (each value times its block's scale); the part's _SUMS setting, or
# KVBENCH_MOE_BLOCKS_FORM=blocks|gather for both parts, overrides it.
# The GPU's: the fastest of benchmarks/bench_moe_blocks.py's sweep at coder30b's geometry (Q4_0,
# forms x rows {2,4,8} x BLOCK_K {512,1024} x warps {2,4}; reports/h100-2026-12-05c call 1, H100,
# each launch reading HBM): gate/up 11.2 us (1269 GB/s) at blocks 8 x 512 x 2 warps, down 10.5 us
# (673 GB/s) at blocks 4 x 512 x 4 warps, against 18.4 and 12.3 us for the best per-value tiles
# (the previous defaults) and 47 / 28 us (H200) at the first guess of 16 x 256 x 4 warps.
CONFIG = {"gate_up": {"BLOCK_F": 8, "BLOCK_K": 512, "num_warps": 2, "SUMS": True},
          "down": {"BLOCK_D": 4, "BLOCK_K": 512, "num_warps": 4, "SUMS": True}}
# Stacks in page-locked host memory, read in place over PCIe (``PcieExperts``): a read crosses
# the bus, so a program needs more bytes in flight than one reading HBM. The same sweep with the
# stacks pinned on the host (bench_moe_blocks.py --placement pinned; reports/h100-2026-12-05d call
# 2, H100, PCIe): gate/up 299 us (47 GB/s) at blocks 2 x 1024 x 2 warps against 378 us at the HBM
# tiles; down 151 us (47 GB/s) at blocks 4 x 1024 x 4 warps against 168 us.
HOST_CONFIG = {"gate_up": {"BLOCK_F": 2, "BLOCK_K": 1024, "num_warps": 2, "SUMS": True},
               "down": {"BLOCK_D": 4, "BLOCK_K": 1024, "num_warps": 4, "SUMS": True}}
# The interpreter runs programs one by one, each paying a fixed cost per op: a whole small
# expert's rows a program (coder30b-mini: ff 96, d 256), partial tiles masked.
INTERPRETED_CONFIG = {"gate_up": {"BLOCK_F": 128, "BLOCK_K": 256, "num_warps": 4, "SUMS": False},
                      "down": {"BLOCK_D": 256, "BLOCK_K": 256, "num_warps": 4, "SUMS": False}}
LAUNCHES = LaunchLog()     # each launch's applied configuration (part, format, tiles, form)
recording = LAUNCHES.recording          # what a decode step ran: ``StaticDecode.moe_launches``


def _record(part: str, fmt: str, cfg: dict, placement: str) -> None:
    LAUNCHES.record({"part": part, "fmt": fmt, "placement": placement, "form": "blocks" if cfg["SUMS"] else "gather",
                     **{k: v for k, v in cfg.items() if k != "SUMS"}})


def placement_of(stack: "BlockStack", device: torch.device) -> str:
    """"host" for a stack in host memory that a launch on a CUDA ``device`` reads over PCIe,
    else "device" (on a CPU device host and device are one memory)."""
    return "host" if device.type == "cuda" and stack.qs.device.type == "cpu" else "device"


@dataclass
class BlockStack:
    """A [S, N, K] stack of Q4_0 or Q8_0 blocks as quants ``qs`` and scales ``d`` (see module)."""
    fmt: str
    qs: torch.Tensor
    d: torch.Tensor

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"BlockStack: format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        S, N, nb = self.d.shape
        want = (S, N, nb * BLOCK // (8 // FORMATS[self.fmt][0]))
        if tuple(self.qs.shape) != want or self.d.dtype != torch.float16 or \
                self.qs.dtype != (torch.uint8 if self.fmt == "q4_0" else torch.int8):
            raise ValueError(f"BlockStack {self.fmt}: qs {tuple(self.qs.shape)} {self.qs.dtype} and d "
                             f"{tuple(self.d.shape)} {self.d.dtype} do not form a stack (qs {want})")

    @property
    def shape(self) -> tuple[int, int, int]:
        S, N, nb = self.d.shape
        return S, N, nb * BLOCK

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return self.qs.numel() * self.qs.element_size() + self.d.numel() * 2

    def tensors(self) -> list[torch.Tensor]:
        return [self.qs, self.d]

    def __getitem__(self, s) -> "BlockStack":
        """Experts ``s`` (an index or a slice) as a stack of their own (views, no copy)."""
        if isinstance(s, int):
            s = slice(s, s + 1)
        return BlockStack(self.fmt, self.qs[s], self.d[s])

    def to(self, device, non_blocking: bool = False) -> "BlockStack":
        return BlockStack(self.fmt, self.qs.to(device, non_blocking=non_blocking),
                          self.d.to(device, non_blocking=non_blocking))

    @staticmethod
    def empty(fmt: str, shape: tuple[int, int, int], device="cpu", pinned: bool = False) -> "BlockStack":
        """An uninitialised stack on ``device``; ``pinned``: host memory page-locked at its exact
        size (``engine.hostmem.pinned_empty``), for asynchronous copies to a GPU."""
        S, N, K = shape
        if fmt not in FORMATS or K % BLOCK:
            raise ValueError(f"BlockStack.empty: {fmt} over rows of {K} values (a multiple of {BLOCK} needed)")
        per = 8 // FORMATS[fmt][0]
        qdt = torch.uint8 if fmt == "q4_0" else torch.int8
        if pinned:
            from ..hostmem import pinned_empty
            return BlockStack(fmt, pinned_empty((S, N, K // per), qdt), pinned_empty((S, N, K // BLOCK), torch.float16))
        return BlockStack(fmt, torch.empty(S, N, K // per, dtype=qdt, device=device),
                          torch.empty(S, N, K // BLOCK, dtype=torch.float16, device=device))

    @staticmethod
    def from_ggml(raw: torch.Tensor, fmt: str, shape: tuple[int, int, int], out: "BlockStack | None" = None) -> "BlockStack":
        """Split ggml's blocks ``raw`` (uint8, the tensor's bytes, rows of K/32 blocks) into ``out``
        (or a new host stack)."""
        S, N, K = shape
        if fmt not in FORMATS:
            raise ValueError(f"BlockStack.from_ggml: format {fmt!r} is not one of {', '.join(FORMATS)}")
        bytes_per = FORMATS[fmt][1]
        if K % BLOCK or raw.numel() != S * N * (K // BLOCK) * bytes_per:
            raise ValueError(f"BlockStack.from_ggml: {raw.numel()} bytes are not {fmt} blocks of {shape}")
        blocks = raw.reshape(S, N, K // BLOCK, bytes_per)
        out = out if out is not None else BlockStack.empty(fmt, shape)
        out.d.view(torch.uint8).view(S, N, K // BLOCK, 2).copy_(blocks[..., :2])
        q = blocks[..., 2:].reshape(S, N, -1)
        out.qs.copy_(q if fmt == "q4_0" else q.view(torch.int8))
        return out

    def to_ggml(self) -> torch.Tensor:
        """The ggml bytes [S, N, K/32 * bytes-per-block] (uint8), byte-identical to the GGUF's."""
        S, N, nb = self.d.shape
        q = self.qs.view(torch.uint8).reshape(S, N, nb, -1)
        return torch.cat([self.d.contiguous().view(torch.uint8).reshape(S, N, nb, 2), q], dim=-1).reshape(S, N, -1)

    def rows(self, s: int) -> torch.Tensor:
        """Expert ``s`` dequantised: float32 [N, K]."""
        return self[s].dequantize()[0]

    def dequantize(self) -> torch.Tensor:
        """Every value as float32 [S, N, K]."""
        S, N, nb = self.d.shape
        if self.fmt == "q4_0":
            q = self.qs.reshape(S, N, nb, 16)
            v = torch.cat([(q & 15), (q >> 4)], dim=-1).to(torch.float32) - 8.0     # [.., nb, 32]
        else:
            v = self.qs.reshape(S, N, nb, BLOCK).to(torch.float32)
        return (v * self.d.to(torch.float32)[..., None]).reshape(S, N, nb * BLOCK)


# --- Triton kernels -------------------------------------------------------------------------
@triton.jit
def _block_tile(Q, Dsc, q_rows, d_rows, mask_r, X, k0, K, QBITS: tl.constexpr, BLOCK_K: tl.constexpr,
                SUMS: tl.constexpr):
    # rows' values k0 .. k0 + BLOCK_K times x, not yet summed over the tile. SUMS: each 32-value
    # block's products summed, then times the block's one scale: [R, BLOCK_K // 32], from 3-D
    # tiles [R, blocks, bytes of a block] whose last axis is contiguous (16-byte loads), the
    # masks whole blocks. Else each value times its block's scale, loaded per column: [R,
    # BLOCK_K // (8 // QBITS)] float32 (a Q4_0 byte carries two values, so its column holds
    # their two products' sum).
    if SUMS:
        NB: tl.constexpr = BLOCK_K // 32
        cb = k0 // 32 + tl.arange(0, NB)                    # blocks of this step
        mb = cb < K // 32
        mq = mask_r[:, None, None] & mb[None, :, None]
        s = tl.load(Dsc + d_rows + cb[None, :], mask=mask_r[:, None] & mb[None, :], other=0.0).to(tl.float32)
        if QBITS == 4:
            j = tl.arange(0, 16)
            q = tl.load(Q + q_rows[:, :, None] + (cb[:, None] * 16 + j[None, :])[None, :, :], mask=mq,
                        other=0).to(tl.int32)               # [R, NB, 16]: byte j holds values j, j + 16
            xo = cb[:, None] * 32 + j[None, :]
            xl = tl.load(X + xo, mask=mb[:, None], other=0.0).to(tl.float32)
            xh = tl.load(X + xo + 16, mask=mb[:, None], other=0.0).to(tl.float32)
            prod = ((q & 15) - 8).to(tl.float32) * xl[None, :, :] + ((q >> 4) - 8).to(tl.float32) * xh[None, :, :]
        else:
            j = tl.arange(0, 32)
            xo = cb[:, None] * 32 + j[None, :]
            q = tl.load(Q + q_rows[:, :, None] + xo[None, :, :], mask=mq, other=0).to(tl.float32)
            prod = q * tl.load(X + xo, mask=mb[:, None], other=0.0).to(tl.float32)[None, :, :]
        return tl.sum(prod, axis=2) * s
    else:
        if QBITS == 4:
            c = tl.arange(0, BLOCK_K // 2)                      # byte columns of this step
            blk = k0 // 32 + c // 16
            lo = blk * 32 + c % 16                              # the low nibble's value; high: lo + 16
            mask_c = lo < K
            m = mask_r[:, None] & mask_c[None, :]
            q = tl.load(Q + q_rows + (k0 // 2 + c)[None, :], mask=m, other=0).to(tl.int32)
            xl = tl.load(X + lo, mask=mask_c, other=0.0).to(tl.float32)
            xh = tl.load(X + lo + 16, mask=mask_c, other=0.0).to(tl.float32)
            s = tl.load(Dsc + d_rows + blk[None, :], mask=m, other=0.0).to(tl.float32)
            vl = (q & 15).to(tl.float32) - 8.0
            vh = (q >> 4).to(tl.float32) - 8.0
            return s * (vl * xl[None, :] + vh * xh[None, :])
        else:
            c = k0 + tl.arange(0, BLOCK_K)
            mask_c = c < K
            m = mask_r[:, None] & mask_c[None, :]
            q = tl.load(Q + q_rows + c[None, :], mask=m, other=0).to(tl.float32)
            x = tl.load(X + c, mask=mask_c, other=0.0).to(tl.float32)
            s = tl.load(Dsc + d_rows + (c // 32)[None, :], mask=m, other=0.0).to(tl.float32)
            return s * (q * x[None, :])


@triton.jit
def _blocks_gate_up_kernel(X, GQ, GD, UQ, UD, IDS, TABLE, H, D: tl.constexpr, FF,
                           sgq_e, sgq_f, sgd_e, sgd_f, suq_e, suq_f, sud_e, sud_f, stride_hk,
                           USE_TABLE: tl.constexpr, QBITS: tl.constexpr, UNROLL: tl.constexpr,
                           BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, SUMS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (k, cdiv(FF, BLOCK_F)); H[j, f] = silu(gate[s_j, f] . x) * (up[s_j, f] . x)
    j = tl.program_id(0)
    s = _expert_row(IDS, TABLE, j, USE_TABLE)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < FF
    f64 = offs_f[:, None].to(tl.int64)
    gq, gd = s * sgq_e + f64 * sgq_f, s * sgd_e + f64 * sgd_f
    uq, ud = s * suq_e + f64 * suq_f, s * sud_e + f64 * sud_f
    W: tl.constexpr = BLOCK_K // 32 if SUMS else BLOCK_K // (8 // QBITS)
    acc_g = tl.zeros([BLOCK_F, W], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F, W], dtype=tl.float32)
    if UNROLL:
        for k0 in tl.static_range(0, D, BLOCK_K):
            acc_g += _block_tile(GQ, GD, gq, gd, mask_f, X, k0, D, QBITS, BLOCK_K, SUMS)
            acc_u += _block_tile(UQ, UD, uq, ud, mask_f, X, k0, D, QBITS, BLOCK_K, SUMS)
    else:
        for k0 in range(0, D, BLOCK_K):
            acc_g += _block_tile(GQ, GD, gq, gd, mask_f, X, k0, D, QBITS, BLOCK_K, SUMS)
            acc_u += _block_tile(UQ, UD, uq, ud, mask_f, X, k0, D, QBITS, BLOCK_K, SUMS)
    a = tl.sum(acc_g, axis=1)
    b = tl.sum(acc_u, axis=1)
    tl.store(H + j * stride_hk + offs_f, a / (1.0 + tl.exp(-a)) * b, mask=mask_f)


@triton.jit
def _blocks_down_kernel(H, WQ, WD, IDS, TABLE, P, R, OUT, D, FF: tl.constexpr, K: tl.constexpr,
                        swq_e, swq_d, swd_e, swd_d, stride_hk,
                        USE_TABLE: tl.constexpr, HAS_RES: tl.constexpr, QBITS: tl.constexpr,
                        UNROLL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                        SUMS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (cdiv(D, BLOCK_D),); OUT[r] = R[r] + sum_j P[j] * (down[s_j, r] . H[j]): one flat
    # loop over (expert, column block) pairs, so loads pipeline across experts too
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d[:, None].to(tl.int64)
    n_k: tl.constexpr = (FF + BLOCK_K - 1) // BLOCK_K
    W: tl.constexpr = BLOCK_K // 32 if SUMS else BLOCK_K // (8 // QBITS)
    acc = tl.zeros([BLOCK_D, W], dtype=tl.float32)
    if UNROLL:
        for t in tl.static_range(0, K * n_k):
            s = _expert_row(IDS, TABLE, t // n_k, USE_TABLE)
            p = tl.load(P + t // n_k).to(tl.float32)
            acc += p * _block_tile(WQ, WD, s * swq_e + d64 * swq_d, s * swd_e + d64 * swd_d, mask_d,
                                   H + (t // n_k) * stride_hk, (t % n_k) * BLOCK_K, FF, QBITS, BLOCK_K, SUMS)
    else:
        for t in range(0, K * n_k):
            s = _expert_row(IDS, TABLE, t // n_k, USE_TABLE)
            p = tl.load(P + t // n_k).to(tl.float32)
            acc += p * _block_tile(WQ, WD, s * swq_e + d64 * swq_d, s * swd_e + d64 * swd_d, mask_d,
                                   H + (t // n_k) * stride_hk, (t % n_k) * BLOCK_K, FF, QBITS, BLOCK_K, SUMS)
    y = tl.sum(acc, axis=1)
    if HAS_RES:
        y += tl.load(R + offs_d, mask=mask_d, other=0.0)
    tl.store(OUT + offs_d, y, mask=mask_d)


# --- launch wrapper -------------------------------------------------------------------------
def _check(x, gate, up, down, ids, weights, table, residual):
    if not all(isinstance(t, BlockStack) for t in (gate, up, down)):
        raise ValueError("moe_decode_blocks: gate, up and down must be BlockStacks")
    if len({gate.fmt, up.fmt, down.fmt}) != 1:
        raise ValueError(f"moe_decode_blocks: gate {gate.fmt}, up {up.fmt}, down {down.fmt} differ")
    check_stacks_and_route("moe_decode_blocks", x, gate, up, down, ids, weights, table, residual)
    for name, st in (("gate", gate), ("up", up), ("down", down)):
        if st.qs.stride(-1) != 1 or st.d.stride(-1) != 1:
            raise ValueError(f"moe_decode_blocks: {name}'s rows must be contiguous")


def moe_decode_blocks(x: torch.Tensor, gate: BlockStack, up: BlockStack, down: BlockStack,
                      ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launches (interpreted on CPU); see the module docstring. float32 [1, d]."""
    _check(x, gate, up, down, ids, weights, table, residual)
    d = gate.shape[2]
    x1 = x.reshape(d).to(torch.float32).contiguous()
    ids = ids.contiguous()
    p = weights.to(torch.float32).contiguous()
    tab = None if table is None else table.contiguous()
    res = None if residual is None else residual.reshape(d).to(torch.float32).contiguous()
    h = gate_up_launch(x1, gate, up, ids, tab)
    return down_launch(h, down, ids, tab, p, res, x1)


def launch_config(part: str, placement: str = "device") -> dict:
    """``part``'s ("gate_up" / "down") tiles and form as a launch now applies them: ``CONFIG``
    (``HOST_CONFIG`` for stacks in host memory, ``placement="host"``) under the settings set at
    this moment (read at each launch), checked."""
    from .. import settings
    from . import interpreted
    if placement not in ("device", "host"):
        raise ValueError(f"launch_config: placement {placement!r} is not 'device' or 'host'")
    base = INTERPRETED_CONFIG if interpreted() else HOST_CONFIG if placement == "host" else CONFIG
    cfg = {**base[part], **settings.overrides(_TUNABLES[part])}
    bk = cfg["BLOCK_K"]
    if bk < BLOCK or bk & (bk - 1):
        from ..errors import ConfigError
        raise ConfigError(f"{_TUNABLES[part]['BLOCK_K']}={bk} is not a power of two >= {BLOCK}",
                          "use 32, 64, 128, 256, ...")
    form = settings.get("KVBENCH_MOE_BLOCKS_FORM")
    return {**cfg, "UNROLL": bool(settings.get("KVBENCH_MOE_UNROLL")),
            "SUMS": bool(cfg["SUMS"]) if form == "auto" else form == "blocks"}


def gate_up_launch(x1: torch.Tensor, gate: BlockStack, up: BlockStack, ids: torch.Tensor,
                   table: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """The first launch alone: ``h [k, ff]`` float32, ``silu(gate[s_j] @ x) * (up[s_j] @ x)``
    (``x1`` float32 [d] contiguous). ``cfg``: a full ``launch_config`` (benchmarks' sweeps)."""
    where = placement_of(gate, x1.device)
    cu = cfg or launch_config("gate_up", where)
    S, ff, d = gate.shape
    k = ids.shape[0]
    h = torch.empty(k, ff, dtype=torch.float32, device=x1.device)
    _blocks_gate_up_kernel[(k, triton.cdiv(ff, cu["BLOCK_F"]))](
        x1, gate.qs, gate.d, up.qs, up.d, ids, ids if table is None else table, h, d, ff,
        gate.qs.stride(0), gate.qs.stride(1), gate.d.stride(0), gate.d.stride(1),
        up.qs.stride(0), up.qs.stride(1), up.d.stride(0), up.d.stride(1), h.stride(0),
        USE_TABLE=table is not None, QBITS=FORMATS[gate.fmt][0], UNROLL=cu["UNROLL"],
        BLOCK_F=cu["BLOCK_F"], BLOCK_K=cu["BLOCK_K"], SUMS=cu["SUMS"], num_warps=cu["num_warps"], **pdl_launch())
    _record("gate_up", gate.fmt, cu, where)
    return h


def down_launch(h: torch.Tensor, down: BlockStack, ids: torch.Tensor, table: torch.Tensor | None,
                p: torch.Tensor, res: torch.Tensor | None, x1: torch.Tensor,
                cfg: dict | None = None) -> torch.Tensor:
    """The second launch alone: ``res + sum_j p[j] * down[s_j] @ h[j]`` as float32 [1, d]
    (``x1`` only fills the unused residual argument when ``res`` is None)."""
    where = placement_of(down, h.device)
    cd = cfg or launch_config("down", where)
    S, d, ff = down.shape
    k = ids.shape[0]
    out = torch.empty(1, d, dtype=torch.float32, device=h.device)
    _blocks_down_kernel[(triton.cdiv(d, cd["BLOCK_D"]),)](
        h, down.qs, down.d, ids, ids if table is None else table, p, x1 if res is None else res, out, d, ff, k,
        down.qs.stride(0), down.qs.stride(1), down.d.stride(0), down.d.stride(1), h.stride(0),
        USE_TABLE=table is not None, HAS_RES=res is not None, QBITS=FORMATS[down.fmt][0], UNROLL=cd["UNROLL"],
        BLOCK_D=cd["BLOCK_D"], BLOCK_K=cd["BLOCK_K"], SUMS=cd["SUMS"], num_warps=cd["num_warps"], **pdl_launch())
    _record("down", down.fmt, cd, where)
    return out


_TUNABLES = {"gate_up": {"BLOCK_F": "KVBENCH_MOE_BLOCKS_GU_BLOCK_F", "BLOCK_K": "KVBENCH_MOE_BLOCKS_GU_BLOCK_K",
                         "num_warps": "KVBENCH_MOE_BLOCKS_GU_WARPS", "SUMS": "KVBENCH_MOE_BLOCKS_GU_SUMS"},
             "down": {"BLOCK_D": "KVBENCH_MOE_BLOCKS_DOWN_BLOCK_D", "BLOCK_K": "KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K",
                      "num_warps": "KVBENCH_MOE_BLOCKS_DOWN_WARPS", "SUMS": "KVBENCH_MOE_BLOCKS_DOWN_SUMS"}}


# --- torch reference ------------------------------------------------------------------------
def moe_decode_blocks_ref(x: torch.Tensor, gate: BlockStack, up: BlockStack, down: BlockStack,
                          ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor | None = None,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: ``moe_decode_ref`` over the dequantised stacks (float32, one expert at a time)."""
    _check(x, gate, up, down, ids, weights, table, residual)
    return moe_decode_ref(x, gate.dequantize(), up.dequantize(), down.dequantize(), ids, weights,
                          table=table, residual=residual)
