"""Routed experts computed on the host CPU from their Q4_0 blocks (the hybrid's CPU experts).

Contract: ``HostQ4Experts.from_blocks(gate, up, down)`` takes one MoE layer's routed experts
as host ``BlockStack``s in Q4_0 (``engine.kernels.moe_blocks``: gate/up [E, ff, d], down
[E, d, ff]) and repacks them, once at load, into torch's CPU int4 matmul layout
(``torch.ops.aten._weight_int4pack_mm_for_cpu``: 4-bit values ``q`` with one (scale, zero)
per 32 values, computing ``(q - 8) * scale + zero``; Q4_0's ``d * (q - 8)`` is that with
``zero = 0``). Gate and up of an expert are one [2 ff, d] matrix, so an expert takes two
matmuls. ``experts(h, ids, weights)`` returns ``sum_j weights[j] * down[e_j] @ (silu(gate[e_j]
@ h) * (up[e_j] @ h))`` as float32 [1, d] for one host token ``h`` [1, d] and host ``ids``.

The maths (``MATH``, recorded wherever these experts run): torch's CPU int4 kernel is fast
only in bfloat16 (float32 activations take a path about 25x slower), so activations and the
block scales are rounded to bfloat16 (the scale's fp16 mantissa of 10 bits to 7); products
accumulate in float32 inside the kernel, the SiLU gate and the weighted sum are float32.
That is a speed path, as llama.cpp's CPU experts (activations rounded to Q8_0 blocks) are:
``tests/test_cpu_experts.py`` bounds its distance from the exact float32 maths over the same
GGUF values. The packing layout is torch's, which depends on the CPU kernels torch dispatches
to: tiles of 64 rows under AVX-512, 32 under AVX2, rows ``n`` and ``n + tile/2`` of a tile in one
byte, a last partial tile pairing adjacent rows. ``pack_int4`` writes it directly with the tile
that matches ``_convert_weight_to_int4pack_for_cpu`` on a probe, found once per process
(``packing()`` says "direct", ``packing_tile()`` which tile); where neither matches, torch's op
packs (slower, same result) and ``packing()`` says "torch-op".

    ex = HostQ4Experts.from_blocks(gate, up, down)       # host BlockStacks, Q4_0
    y = ex(h_host, top_e_host, top_p_host)               # float32 [1, d]
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .kernels.moe_blocks import BLOCK, BlockStack

MATH = "bf16 activations and block scales, float32 accumulation (torch CPU int4)"


def _values(st: BlockStack) -> torch.Tensor:
    """Q4_0 nibbles in value order: uint8 [S, N, K], 0..15."""
    S, N, nb = st.d.shape
    q = st.qs.reshape(S, N, nb, 16)
    return torch.cat([q & 15, q >> 4], dim=-1).reshape(S, N, nb * BLOCK)


def pack_int4(v: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Values ``v`` [N, K] (0..15) in torch's CPU int4 layout, uint8 [N, K/2] (see module), with
    tiles of ``tile`` rows (default: the tile this process's torch packs with, ``packing_tile()``)."""
    N, K = v.shape
    if N % 16 or K % 2:
        raise ValueError(f"pack_int4: [{N}, {K}] needs rows a multiple of 16 and an even row length")
    tile = tile or packing_tile() or 64
    v = v.to(torch.uint8)
    full = N // tile * tile
    parts = []
    if full:
        t = v[:full].reshape(full // tile, 2, tile // 2, K)              # [tile, nibble, row, k]
        parts.append((t[:, 0] | (t[:, 1] << 4)).permute(0, 2, 1).reshape(-1))   # [tile, k, row]
    if N > full:
        r = N - full
        t = v[full:].reshape(r // 2, 2, K)                                # [pair, nibble, k]
        parts.append((t[:, 0] | (t[:, 1] << 4)).permute(1, 0).reshape(-1))      # [k, pair]
    return torch.cat(parts).reshape(N, K // 2)


@functools.cache
def packing_tile() -> int | None:
    """The tile (64 or 32 rows) whose ``pack_int4`` equals torch's packing op on a probe of 80 rows
    (whole tiles and a partial one under either), or None where neither does."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (80, 64), generator=g, dtype=torch.int32)
    op = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for tile in (64, 32):
        if torch.equal(op, pack_int4(probe, tile)):
            return tile
    return None


def packing() -> str:
    """``"direct"`` when ``pack_int4`` writes torch's layout on this machine (``packing_tile()``
    found), else ``"torch-op"``."""
    return "direct" if packing_tile() else "torch-op"


def _pack(v: torch.Tensor) -> torch.Tensor:
    if packing() == "direct":
        return pack_int4(v)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(v.to("cpu", torch.int32).contiguous(), 1)


def _scales(d: torch.Tensor, out: torch.Tensor) -> None:
    """Block scales [N, K/32] fp16 -> torch's (scale, zero) pairs ``out`` [K/32, N, 2] in bf16."""
    out[..., 0] = d.T.to(out.device, torch.bfloat16)
    out[..., 1] = 0


def packed_bytes(n_experts: int, ff: int, d: int) -> int:
    """Host bytes of one layer's packed experts (``engine.planner.int4_packed_bytes``: what the
    planner prices)."""
    from .planner import int4_packed_bytes
    return int4_packed_bytes(n_experts, ff, d)


class HostQ4Experts:
    """One layer's routed experts packed for the CPU int4 matmul (see module): stacks ``gu``
    uint8 [E, 2 ff, d/2], ``gu_sz`` bf16 [E, d/32, 2 ff, 2], ``down`` uint8 [E, d, ff/2],
    ``down_sz`` bf16 [E, ff/32, d, 2]; expert ``e`` is index ``e`` of each (contiguous)."""

    math = MATH

    def __init__(self, gu: torch.Tensor, gu_sz: torch.Tensor, down: torch.Tensor, down_sz: torch.Tensor):
        self.gu, self.gu_sz, self.down, self.down_sz = gu, gu_sz, down, down_sz
        self.n_experts, self.d, self.ff = down.shape[0], down.shape[1], down.shape[2] * 2

    @staticmethod
    def empty(n_experts: int, ff: int, d: int) -> "HostQ4Experts":
        E = n_experts
        return HostQ4Experts(torch.empty(E, 2 * ff, d // 2, dtype=torch.uint8),
                             torch.empty(E, d // BLOCK, 2 * ff, 2, dtype=torch.bfloat16),
                             torch.empty(E, d, ff // 2, dtype=torch.uint8),
                             torch.empty(E, ff // BLOCK, d, 2, dtype=torch.bfloat16))

    @classmethod
    def from_blocks(cls, gate: BlockStack, up: BlockStack, down: BlockStack,
                    out: "HostQ4Experts | None" = None, first: int = 0) -> "HostQ4Experts":
        """Pack Q4_0 stacks into ``out`` (or new host stacks). The stacks may be on a GPU: the
        repacking runs there (a load's ~0.5 s a coder30b layer on two CPU cores) and only the
        packed bytes come to the host. ``first``: the stacks are experts ``first ...`` of
        ``out`` (a load packs a layer in chunks of experts)."""
        if {gate.fmt, up.fmt, down.fmt} != {"q4_0"}:
            raise ValueError(f"HostQ4Experts: experts in {gate.fmt}/{up.fmt}/{down.fmt}; the CPU int4 path "
                             "takes Q4_0 only")
        E, ff, d = gate.shape
        if up.shape != gate.shape or down.shape != (E, d, ff):
            raise ValueError(f"HostQ4Experts: gate {gate.shape}, up {up.shape}, down {down.shape} do not agree")
        out = out if out is not None else cls.empty(E, ff, d)
        if out.n_experts < first + E or (out.d, out.ff) != (d, ff):
            raise ValueError(f"HostQ4Experts.from_blocks: experts {first}..{first + E - 1} of [{ff}, {d}] do not "
                             f"fit a packing of {out.n_experts} experts of [{out.ff}, {out.d}]")
        for e in range(E):
            o = first + e
            out.gu[o].copy_(_pack(torch.cat([_values(gate[e])[0], _values(up[e])[0]])))
            _scales(torch.cat([gate.d[e], up.d[e]]), out.gu_sz[o])
            out.down[o].copy_(_pack(_values(down[e])[0]))
            _scales(down.d[e], out.down_sz[o])
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.gu, self.gu_sz, self.down, self.down_sz]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __call__(self, h: torch.Tensor, ids, weights) -> torch.Tensor:
        """float32 [1, d]: the weighted sum of the experts ``ids`` (host ints) on ``h`` [1, d]."""
        return self.rows(h.reshape(1, self.d), [list(ids.tolist() if torch.is_tensor(ids) else ids)],
                         [list(weights.tolist() if torch.is_tensor(weights) else weights)])

    def rows(self, h: torch.Tensor, ids: list[list[int]], weights: list[list[float]]) -> torch.Tensor:
        """float32 [T, d] for T host rows ``h`` [T, d], row t through experts ``ids[t]`` weighted
        ``weights[t]``: each expert runs once over the rows that chose it."""
        x = h.to(torch.bfloat16)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        if h.shape[0] == 1:              # one token (decode): the element-wise work once for all k experts
            es = [int(e) for e in ids[0]]
            gu = torch.cat([mm(x, self.gu[e], BLOCK, self.gu_sz[e]) for e in es]).float()    # [k, 2 ff]
            a = (F.silu(gu[:, :self.ff]) * gu[:, self.ff:]).to(torch.bfloat16)
            out = torch.cat([mm(a[j:j + 1], self.down[e], BLOCK, self.down_sz[e]) for j, e in enumerate(es)])
            return torch.tensor([weights[0]], dtype=torch.float32) @ out.float()             # [1, d]
        y = torch.zeros(h.shape[0], self.d, dtype=torch.float32)
        by_expert: dict[int, list[tuple[int, float]]] = {}
        for t, (es, ps) in enumerate(zip(ids, weights)):
            for e, p in zip(es, ps):
                by_expert.setdefault(int(e), []).append((t, float(p)))
        for e in sorted(by_expert):
            rows = [t for t, _ in by_expert[e]]
            p = torch.tensor([q for _, q in by_expert[e]], dtype=torch.float32)[:, None]
            xe = x if len(rows) == h.shape[0] and rows == list(range(len(rows))) else x[rows]
            gu = mm(xe, self.gu[e], BLOCK, self.gu_sz[e]).float()                   # [n, 2 ff]
            a = (F.silu(gu[:, :self.ff]) * gu[:, self.ff:]).to(torch.bfloat16)
            y.index_add_(0, torch.tensor(rows), mm(a, self.down[e], BLOCK, self.down_sz[e]).float() * p)
        return y
