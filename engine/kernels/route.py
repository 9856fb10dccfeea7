"""MoE routing without a sort: router softmax, top-k and renormalisation in one Triton launch.

Contract: ``route_topk(logits, k, renorm)`` takes router logits [T, E] (or [E]) float32 on
any device and returns ``(top_p [T, k] float32, top_e [T, k] int64)`` (``[k]`` for a 1-D
input): ``p = softmax(logits)`` over the E experts, the k largest in descending order, and
when ``renorm`` (the spec's ``moe_norm_topk``: qwen3moe and Mixtral-style llama True, olmoe
False) ``top_p / top_p.sum()``. This is ``engine.model.moe_route`` after its router matmul.
One program per row; the E logits sit in registers and the k winners are found by k max
reductions (no sort: ``torch.topk`` on the GPU is gatherTopK + bitonicSort, ~10 us per layer).
Selection is on the logits (softmax is monotonic, so the set is the same as on the
probabilities and independent of how exp rounds); **ties go to the lowest expert id**, a
deterministic rule (``torch.topk`` promises no order among equal values: on the CPU it
returns ``[70, 5]`` for two equal maxima at 5 and 70). Logits must be finite (a router's are).
Launches read nothing on the host, so a CUDA graph can capture them (called outside
``torch.compile``, between the compiled post-attention maths and the MoE kernel).
``route_topk_ref`` is the plain torch reference with the same tie rule (softmax, then k
``argmax`` passes, each taking the first maximal index).

    top_p, top_e = route_topk(h @ router.T, spec.n_experts_used, spec.moe_norm_topk)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pdl_enter, pdl_launch


@triton.jit
def _route_topk_kernel(L, P, IDX, E, stride_l, stride_p, stride_i,
                       K: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # one program per row; KP = K rounded up to a power of two (tl.arange), lanes >= K unused
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    live = offs < E
    x = tl.load(L + row * stride_l + offs, mask=live, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    ex = tl.where(live, tl.exp(x - m), 0.0)
    p = ex / tl.sum(ex, axis=0)                           # softmax over the E experts
    koffs = tl.arange(0, KP)
    top_p = tl.zeros([KP], dtype=tl.float32)
    top_i = tl.zeros([KP], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(tl.where(live, x, float("-inf")), axis=0)
        # the lowest index among the maxima still in play (selection on the logits)
        idx = tl.min(tl.where((x == best) & live, offs, BLOCK_E), axis=0)
        pj = tl.sum(tl.where(offs == idx, p, 0.0), axis=0)
        top_p = tl.where(koffs == j, pj, top_p)
        top_i = tl.where(koffs == j, idx, top_i)
        live = live & (offs != idx)
    if RENORM:
        top_p = top_p / tl.sum(top_p, axis=0)            # lanes >= K hold 0
    keep = koffs < K
    tl.store(P + row * stride_p + koffs, top_p, mask=keep)
    tl.store(IDX + row * stride_i + koffs, top_i.to(tl.int64), mask=keep)


def _check(logits: torch.Tensor, k: int) -> None:
    if logits.dim() not in (1, 2):
        raise ValueError(f"route_topk: logits {tuple(logits.shape)} must be [E] or [T, E]")
    E = logits.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"route_topk: k={k} must be in [1, {E}]")


def route_topk(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launch (interpreted on CPU); see the module docstring."""
    _check(logits, k)
    one = logits.dim() == 1
    lg = logits.reshape(1, -1) if one else logits
    if lg.stride(-1) != 1:
        lg = lg.contiguous()
    T, E = lg.shape
    p = torch.empty(T, k, dtype=torch.float32, device=lg.device)
    idx = torch.empty(T, k, dtype=torch.int64, device=lg.device)
    _route_topk_kernel[(T,)](lg, p, idx, E, lg.stride(0), p.stride(0), idx.stride(0),
                             K=k, KP=triton.next_power_of_2(k), RENORM=bool(renorm),
                             BLOCK_E=triton.next_power_of_2(E), num_warps=1, **pdl_launch())
    return (p[0], idx[0]) if one else (p, idx)


def route_topk_ref(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch ground truth: softmax, k first-occurrence argmax passes over the logits."""
    _check(logits, k)
    one = logits.dim() == 1
    lg = (logits.reshape(1, -1) if one else logits).float()
    probs = torch.softmax(lg, dim=-1)
    sel = lg.clone()
    ids = []
    for _ in range(k):
        i = sel.argmax(-1, keepdim=True)             # the first maximal index
        ids.append(i)
        sel.scatter_(-1, i, float("-inf"))
    top_e = torch.cat(ids, -1)
    top_p = probs.gather(-1, top_e)
    if renorm:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return (top_p[0], top_e[0]) if one else (top_p, top_e)
