"""The hybrid placement: a plan's GPU trunk, CPU tail and expert cache made real.

Contract: ``place(plan, spec, device) -> Placement`` says where each layer, the head and the
routed experts live: layers ``[0, plan.n_gpu_layers)`` (the trunk) on ``device``, the tail on
the CPU; the head on the trunk when the plan puts it there; a trunk MoE layer's routed
experts on the host, streamed through the SLRU expert cache (``engine.expert_cache``) on the
trunk device; a tail MoE layer computes with its host experts directly. ``bind_weights``
reads the weights into that placement (``load_weights``: one tensor at a time, straight
into its storage dtype and device; routed experts pinned at their exact size on CUDA) or
takes over an engine's weights (``take_over`` first frees that engine's KV, scratch and
expert cache and checks the placement is the same), builds the expert cache and the
``Transformer``, and records every buffer in the ledger with its category and tier, so
``ledger.compare(plan)`` holds the runtime to the plan byte for byte. ``alloc_scratch`` and
``register_kv`` do the same for scratch and KV. A layer's q/k/v are read into one fused
buffer where ``fuse_qkv`` allows (recorded once as ``blk.i.wqkv``; ``wq``/``wk``/``wv`` are
its row views), a dense layer's gate/up into one ``w_gu`` where ``fuse_gate_up`` allows
(``blk.i.w_gu``; ``w_gate``/``w_up`` its row views), and a plan with ``embed_tier == "trunk"`` gets a device copy of
``token_embd`` (``token_embd.trunk``, trunk weights) for the static step's embedding.

    placement = place(plan, spec, torch.device("cuda"))
    model, cache = bind_weights(gguf, spec, plan, placement, ledger, torch.bfloat16)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from . import qweights
from .gguf_io import GGUFFile
from .hostmem import pinned_empty
from .formats import round_alloc
from .model import Experts, LayerWeights, Transformer, fused_gate_up_on, fused_qkv_on, split_gate_up_rows, split_qkv_rows
from .spec import ModelSpec

HOST = torch.device("cpu")


class WeightsPlacementError(ConfigError):
    """``weights_from`` an engine whose weights are placed differently from the new plan."""


@dataclass(frozen=True)
class Placement:
    tiers: list[str]                      # per layer: "trunk" | "host"
    layer_devices: list[torch.device]
    head_device: torch.device | None      # None: the host (a tied head reads token_embd there)
    trunk_moe: list[int]                  # MoE layers whose experts stream through the cache
    device: torch.device


def place(plan, spec: ModelSpec, device: torch.device) -> Placement:
    tiers = list(plan.layer_tiers)
    streamed = getattr(plan, "expert_format", "weights") == "weights"   # blocks: no expert cache
    return Placement(tiers, [device if t == "trunk" else HOST for t in tiers],
                     device if plan.head_tier == "trunk" else None,
                     [i for i in spec.moe_layers if tiers[i] == "trunk" and streamed], device)


def take_over(reuse, plan, placement: Placement) -> None:
    """Free ``reuse``'s KV, scratch and expert cache (its weights stay) before the new ones
    are allocated; ``reuse`` cannot run afterwards. Raises ``WeightsPlacementError`` (nothing
    freed) when the plan places layers or head differently."""
    old_experts = (reuse.plan.expert_format, reuse.plan.layer_expert_tiers)
    blocks = {plan.expert_format, reuse.plan.expert_format} != {"weights"}   # a layer split: held below
    if blocks and (plan.expert_format, plan.layer_expert_tiers) != old_experts:
        raise WeightsPlacementError(f"weights_from: this plan keeps experts as {plan.expert_format} with "
                                    f"{plan.cpu_moe} MoE layers on the CPU, the loaded weights as "
                                    f"{old_experts[0]} with {reuse.plan.cpu_moe}",
                                    "load afresh (no weights_from), or ask for the same expert placement")
    if (placement.tiers, plan.head_tier) != (reuse.plan.layer_tiers, reuse.plan.head_tier):
        raise WeightsPlacementError(f"weights_from: this plan puts {plan.n_gpu_layers} layers and the head on "
                                    f"{plan.head_tier}, the loaded weights are placed for "
                                    f"{reuse.plan.n_gpu_layers} and {reuse.plan.head_tier}",
                                    "load afresh (no weights_from) for this budget")
    ledger = reuse.ledger
    for c in reuse.caches:
        for buf in (c.k, c.v):
            ledger.free(buf)
    for buf in (reuse.expert_cache.slots if reuse.expert_cache is not None else ()):
        ledger.free(buf)
    for name in [f"scratch.{item}" for item in reuse.plan.scratch_items] + \
            ["scratch.host"] * bool(reuse.plan.host.scratch):
        ledger.release(name)
    left = {(c, t): ledger.current(c, t) for c in ("kv", "scratch", "expert_cache") for t in ("trunk", "host")}
    if any(left.values()):
        raise ConfigError(f"weights_from: buffers outside the weights are still recorded ({left})",
                          "load afresh (no weights_from)")
    reuse.taken_model = reuse.model
    reuse.model = reuse.expert_cache = reuse._static = None   # a captured decode graph holds old buffers
    reuse.caches = []
    for i in placement.trunk_moe:   # unbind the old cache's slots so they are freed before the new ones exist
        reuse.taken_model.layers[i].experts = Experts(*reuse.taken_model.layers[i].experts.tensors())
    import gc
    gc.collect()      # what only a reference cycle still holds goes now, before the new buffers exist


def bind_weights(g: GGUFFile, spec: ModelSpec, plan, placement: Placement, ledger, wdtype: torch.dtype,
                 reuse=None):
    """(Transformer, expert cache or None) for the placement: read from ``g``, or the weights
    ``take_over`` left on ``reuse``; every weight recorded in ``ledger``."""
    from .expert_cache import ExpertCache
    cache = (ExpertCache.for_spec(spec, ledger, plan.expert_slots, dtype=wdtype)
             if placement.trunk_moe else None)
    if reuse is not None:
        old = reuse.__dict__.pop("taken_model")
        layers = [LayerWeights(**vars(lw)) for lw in old.layers]
        for i in placement.trunk_moe:
            layers[i].experts = cache.layer(i, *layers[i].experts.tensors())
        model = Transformer(spec, layers, old.embed, old.out_norm, old.output, old.layer_devices,
                            old.head_device)
        _bind_embed_copy(model, plan, placement, ledger, old.embed_device)
        return model, cache
    dev = placement.device
    # streamed: each tensor is decoded (on the GPU when there is one) straight into its storage
    blocks = getattr(plan, "expert_format", "weights") != "weights"
    layers, embed, out_norm, output = load_weights(
        g, spec, wdtype, placement.layer_devices, placement.head_device, pin_experts=dev.type == "cuda",
        decode_device=dev if dev.type == "cuda" else None,
        expert_blocks=plan.expert_format if blocks else None,
        expert_tiers=plan.layer_expert_tiers if blocks else None)
    for i, lw in enumerate(layers):
        tier = placement.tiers[i]
        for name, value in lw.owned():          # a fused wqkv once, not its wq/wk/wv views
            ledger.register("weights", value, tier, name=f"blk.{i}.{name}")
        if blocks and lw.experts is not None:   # resident blocks on the trunk, or packed on the host
            where = plan.layer_expert_tiers[i]       # "trunk", "cpu" (packed + blocks), "pcie"/"dma" (blocks)
            blocks = ("gate.qs", "gate.d", "up.qs", "up.d", "down.qs", "down.d")
            names = ("gu", "gu_sz", "down", "down_sz", *blocks) if where == "cpu" else blocks
            for n, t in zip(names, lw.experts.tensors()):
                ledger.register("weights", t, "trunk" if where == "trunk" else "host", name=f"blk.{i}.experts.{n}")
        elif lw.experts is not None:
            hosted = [ledger.register("weights", t, "host", name=f"blk.{i}.experts.{n}")
                      for n, t in zip(("gate", "up", "down"), lw.experts.tensors())]
            if tier == "trunk":
                lw.experts = cache.layer(i, *hosted)
    ledger.register("weights", embed, "host", name="token_embd")
    if plan.head_tier == "trunk":
        ledger.register("weights", out_norm, "trunk", name="output_norm")
        ledger.register("weights", output, "trunk", name="output")
    else:
        ledger.register("weights", out_norm, "host", name="output_norm")
        if not spec.tied_output:
            ledger.register("weights", output, "host", name="output")
    model = Transformer(spec, layers, embed, out_norm, output, placement.layer_devices,
                        placement.head_device or HOST)
    _bind_embed_copy(model, plan, placement, ledger, None)
    return model, cache


def is_mapped(t: torch.Tensor) -> bool:
    """A CUDA view of page-locked host memory (``hostmem.device_view``), not device memory."""
    from .hostmem import is_registered
    return t.device.type == "cuda" and is_registered(t)


def _bind_embed_copy(model: Transformer, plan, placement: Placement, ledger, old) -> None:
    """The static decode's embedding table on the device, as the plan has it:
    ``embed_tier == "trunk"``: a device copy of ``token_embd``, recorded as trunk weights;
    ``"mapped"``: a CUDA view of the host table, page-locked in place and read over PCIe (no
    trunk bytes; the host bytes are ``token_embd``'s own); ``"host"``: none. ``old`` (a
    taken-over engine's table) is kept when it is the copy the plan wants, else freed."""
    tier = getattr(plan, "embed_tier", "host")
    if old is not None and is_mapped(old):       # a view of the host table: nothing to free
        old = None
    if old is not None and tier != "trunk":
        ledger.free(old)
        old = None
    if tier == "mapped":
        from .hostmem import device_view, register
        model.embed_device = device_view(register(model.embed), placement.device)
        return
    if tier == "trunk" and old is None:
        old = ledger.register("weights", model.embed.to(placement.device, copy=True), "trunk",
                              name="token_embd.trunk")
    model.embed_device = old


def alloc_scratch(plan, ledger) -> dict:
    """The plan's scratch buffers, recorded in the ledger; returns {item: uint8 buffer}."""
    out = {}
    for item, nbytes in plan.scratch_items.items():
        out[item] = ledger.alloc("scratch", (nbytes,), torch.uint8, "trunk", name=f"scratch.{item}", zero=False)
    if plan.host.scratch:
        ledger.alloc("scratch", (plan.host.scratch,), torch.uint8, "host", name="scratch.host", zero=False)
    return out


def bind_staging(model, spec, plan, scratch: dict) -> None:
    """The DMA layers' shared staging stacks, carved from the plan's ``expert_staging``."""
    buf = scratch.get("expert_staging")
    if buf is None:
        return
    from .model import DmaExperts, carve_staging
    from .planner import expert_staging_parts
    stage = carve_staging(buf, spec, plan.expert_format, expert_staging_parts(spec, plan.expert_format))
    for lw in model.layers:
        if isinstance(lw.experts, DmaExperts):
            lw.experts.stage = stage


def register_kv(caches, placement: Placement, ledger) -> None:
    for i, c in enumerate(caches):
        for j, buf in enumerate((c.k, c.v)):
            ledger.register("kv", buf, placement.tiers[i], name=f"blk.{i}.kv.{j}")


def fuse_qkv(spec: ModelSpec, dtype: torch.dtype, dev: torch.device) -> bool:
    """Whether a layer on ``dev`` stores q/k/v as one fused buffer: ``KVBENCH_DECODE_FUSED_QKV``
    and the allocator takes the same bytes for one buffer as for three (on CUDA every block is
    rounded up to 512 B; the planner prices three), so plan == runtime holds either way."""
    if not fused_qkv_on():
        return False
    size = matrix_row_bytes(dtype, spec.d_model)
    parts = [spec.q_dim * size, spec.kv_dim * size, spec.kv_dim * size]
    return sum(round_alloc(b, dev.type) for b in parts) == round_alloc(sum(parts), dev.type)


def fuse_gate_up(spec: ModelSpec, dtype: torch.dtype, dev: torch.device) -> bool:
    """Whether a dense layer on ``dev`` stores gate/up as one fused buffer:
    ``KVBENCH_DECODE_FUSED_GATE_UP`` and the same allocator bytes as two buffers (``fuse_qkv``)."""
    if not fused_gate_up_on() or not spec.d_ff:
        return False
    b = matrix_row_bytes(dtype, spec.d_model) * spec.d_ff
    return 2 * round_alloc(b, dev.type) == round_alloc(2 * b, dev.type)


def matrix_row_bytes(dtype: torch.dtype, k: int) -> int:
    """Bytes of one stored matrix row of ``k`` values: ``dtype``'s size, or Q8_0 rows for int8
    (``engine.qweights``)."""
    if dtype == torch.int8:
        return qweights.row_bytes(k)
    return torch.empty((), dtype=dtype).element_size() * k


def _matrix_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of a tensor of logical ``shape``: a Q8_0 matrix's rows are bytes."""
    if dtype == torch.int8 and len(shape) == 2:
        return shape[0], qweights.row_bytes(shape[1])
    return tuple(shape)


def load_weights(g: GGUFFile, spec: ModelSpec, dtype: torch.dtype = torch.float32,
                 layer_devices: list[torch.device] | None = None, head_device: torch.device | None = None,
                 pin_experts: bool = False, decode_device: torch.device | None = None,
                 expert_blocks: str | None = None, expert_tiers: list[str] | None = None,
                 ) -> tuple[list[LayerWeights], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every tensor read straight into its storage, shape checked against the spec.

    Matrices and routed experts are stored as ``dtype``, norms float32; ``torch.int8`` means
    Q8_0 matrices (``engine.qweights``, ``GGUFFile.tensor_q8``: a Q8_0 file's bytes as they are),
    which needs routed experts in blocks (``expert_blocks``). Layer ``i``'s resident
    tensors live on ``layer_devices[i]``; routed experts (``Experts``) and ``token_embd`` on the
    host, experts in pinned memory when ``pin_experts``; ``output_norm`` and ``output`` on
    ``head_device`` when given (the head's own tier: a tied output is then its own copy),
    else on the host (a tied output is ``token_embd`` itself). Tensors are decoded one at a
    time in chunks (``GGUFFile.tensor``), on ``decode_device`` when given (e.g. the GPU for
    host-bound tensors: raw blocks go up, the stored dtype comes back), else on their own
    device, so the host never holds more than the stored bytes plus one chunk of float32.
    ``expert_blocks`` ("q4_0" | "q8_0"): routed experts stay in the file's blocks instead, per
    ``expert_tiers``: "trunk" resident ``BlockExperts`` on the layer's device, "cpu"
    ``CpuExperts`` packed on the host (``read_block_experts``).
    Defaults: everything float32 on the host."""
    d, q, kvd = spec.d_model, spec.q_dim, spec.kv_dim
    host = HOST
    layer_devices = layer_devices or [host] * spec.n_layers

    if dtype == torch.int8 and spec.is_moe and expert_blocks is None:
        raise ValueError("load_weights: Q8_0 matrices (int8) need the routed experts in blocks (expert_blocks)")

    def get(name, shape, wdtype, device, out):
        if wdtype == torch.int8:
            return g.tensor_q8(name, shape, device=device, out=out)
        return g.tensor(name, shape, dtype=wdtype, device=device, out=out)

    def read(name, shape, dev, wdtype=dtype, pin=False, out=None):
        if dev.type == "cpu" and (pin or (decode_device is not None and decode_device != dev)):
            # pinned at its exact size (torch's pinned allocator rounds up to a power of two)
            if out is None:
                phys = _matrix_shape(wdtype, shape)
                out = pinned_empty(phys, wdtype) if pin else torch.empty(phys, dtype=wdtype)
            return get(name, shape, wdtype, decode_device or host, out)
        return get(name, shape, wdtype, dev, out)

    def read_qkv(p, dev):
        """(wq, wk, wv, wqkv): with ``fused``, each read straight into its rows of one buffer."""
        if not fuse_qkv(spec, dtype, dev):
            return read(p + "attn_q.weight", (q, d), dev), read(p + "attn_k.weight", (kvd, d), dev), \
                read(p + "attn_v.weight", (kvd, d), dev), None
        wqkv = torch.empty(_matrix_shape(dtype, (q + 2 * kvd, d)), dtype=dtype, device=dev)
        views = split_qkv_rows(wqkv, q, kvd)
        for name, view in zip(("attn_q", "attn_k", "attn_v"), views):
            read(p + name + ".weight", (view.shape[0], d), dev, out=view)
        return (*views, wqkv)

    layers = []
    for i in range(spec.n_layers):
        p, dev = f"blk.{i}.", layer_devices[i]
        t = lambda name, shape: read(p + name, shape, dev)                        # noqa: E731
        norm = lambda name, shape: read(p + name, shape, dev, torch.float32)      # noqa: E731
        wq, wk, wv, wqkv = read_qkv(p, dev)
        lw = LayerWeights(
            attn_norm=norm("attn_norm.weight", (d,)), wq=wq, wk=wk, wv=wv, wqkv=wqkv,
            wo=t("attn_output.weight", (d, q)), ffn_norm=norm("ffn_norm.weight", (d,)))
        if spec.qk_norm == "head":
            lw.q_norm, lw.k_norm = norm("attn_q_norm.weight", (spec.head_dim,)), norm("attn_k_norm.weight", (spec.head_dim,))
        elif spec.qk_norm == "full":
            lw.q_norm, lw.k_norm = norm("attn_q_norm.weight", (q,)), norm("attn_k_norm.weight", (kvd,))
        if spec.post_norms:
            lw.post_attn_norm = norm("post_attention_norm.weight", (d,))
            lw.post_ffn_norm = norm("post_ffw_norm.weight", (d,))
        if i in spec.moe_layers:
            E, ff = spec.n_experts, spec.d_ff_expert
            # under Q8_0 matrices the router stays float32 (engine.planner prices it so)
            lw.router = read(p + "ffn_gate_inp.weight", (E, d), dev, torch.float32 if dtype == torch.int8 else dtype)
            if expert_blocks is not None:
                lw.experts = read_block_experts(g, spec, i, expert_blocks, expert_tiers[i], dev)
                layers.append(lw)
                continue
            lw.experts = Experts(*(read(p + name, shape, host, pin=pin_experts) for name, shape in (
                ("ffn_gate_exps.weight", (E, ff, d)), ("ffn_up_exps.weight", (E, ff, d)),
                ("ffn_down_exps.weight", (E, d, ff)))))
        else:
            ff = spec.d_ff
            if fuse_gate_up(spec, dtype, dev):     # each read straight into its rows of one buffer
                lw.w_gu = torch.empty(_matrix_shape(dtype, (2 * ff, d)), dtype=dtype, device=dev)
                lw.w_gate, lw.w_up = split_gate_up_rows(lw.w_gu)
                read(p + "ffn_gate.weight", (ff, d), dev, out=lw.w_gate)
                read(p + "ffn_up.weight", (ff, d), dev, out=lw.w_up)
            else:
                lw.w_gate, lw.w_up = t("ffn_gate.weight", (ff, d)), t("ffn_up.weight", (ff, d))
            lw.w_down = t("ffn_down.weight", (d, ff))
        layers.append(lw)
    vd = (spec.vocab_size, d)
    embed = read("token_embd.weight", vd, host)
    out_norm = read("output_norm.weight", (d,), head_device or host, torch.float32)
    if spec.tied_output:
        output = embed if head_device is None else embed.to(head_device, copy=True)
    else:
        output = read("output.weight", vd, head_device or host)
    return layers, embed, out_norm, output




LOAD_CHUNK_EXPERTS = 16     # experts a block stack is moved and split in at a time (bounds the transient)


def read_block_experts(g: GGUFFile, spec: ModelSpec, i: int, fmt: str, tier: str, dev: torch.device):
    """Layer ``i``'s routed experts from the file's ``fmt`` blocks: ``BlockExperts`` on ``dev``
    (tier "trunk": the bytes go up as they are and are split into quants and scales there) or
    ``CpuExperts`` (tier "cpu": split and repacked on ``dev`` for the CPU int4 matmul, kept on
    the host: a GPU repacks faster than the host's cores). Work goes ``LOAD_CHUNK_EXPERTS``
    experts at a time, so what the load holds beyond the planned buffers is a few tens of MB
    (within the plan's reserve)."""
    from gguf import GGMLQuantizationType as QT
    from .kernels.moe_blocks import BlockStack
    from .model import BlockExperts, CpuExperts, DmaExperts, PcieExperts
    if tier not in ("trunk", "cpu", "pcie", "dma"):
        raise ValueError(f"read_block_experts: tier {tier!r} is not 'trunk', 'cpu', 'pcie' or 'dma'")
    E, ff, d = spec.n_experts, spec.d_ff_expert, spec.d_model
    qtype = {"q4_0": QT.Q4_0, "q8_0": QT.Q8_0}[fmt]
    shapes = {"gate": (E, ff, d), "up": (E, ff, d), "down": (E, d, ff)}
    raws = {k: g.blocks(f"blk.{i}.ffn_{k}_exps.weight", shp, qtype).reshape(E, -1) for k, shp in shapes.items()}
    if tier == "trunk":
        stacks = {k: BlockStack.empty(fmt, shp, device=dev) for k, shp in shapes.items()}
    elif tier in ("pcie", "dma"):  # host blocks the device reads in place or copies: pinned on CUDA
        stacks = {k: BlockStack.empty(fmt, shp, device=HOST, pinned=dev.type == "cuda") for k, shp in shapes.items()}
    else:                # packed for the CPU; the blocks too (pinned on CUDA), for large batches
        from .cpu_experts import HostQ4Experts
        packed = HostQ4Experts.empty(E, ff, d)
        pin = dev.type == "cuda"
        stacks = {k: BlockStack.empty(fmt, shp, device=HOST, pinned=pin) for k, shp in shapes.items()}
    for e0 in range(0, E, LOAD_CHUNK_EXPERTS):
        e1 = min(E, e0 + LOAD_CHUNK_EXPERTS)
        part = {}
        for k, (_, n, kk) in shapes.items():
            if tier == "trunk":
                part[k] = BlockStack.from_ggml(raws[k][e0:e1].to(dev), fmt, (e1 - e0, n, kk), out=stacks[k][e0:e1])
            else:
                BlockStack.from_ggml(raws[k][e0:e1], fmt, (e1 - e0, n, kk), out=stacks[k][e0:e1])
                if tier == "cpu":
                    part[k] = stacks[k][e0:e1].to(dev)
        if tier == "cpu":
            HostQ4Experts.from_blocks(part["gate"], part["up"], part["down"], out=packed, first=e0)
    blocks = (stacks["gate"], stacks["up"], stacks["down"])
    if tier in ("pcie", "dma"):
        return (PcieExperts if tier == "pcie" else DmaExperts)(*blocks)
    return BlockExperts(*blocks) if tier == "trunk" else CpuExperts(packed, blocks)
