"""VRAM planner: (ModelSpec, budget, ctx, KV dtype, wave budget) -> Plan of bytes per tier.

Contract: ``plan(spec, ...)`` is pure arithmetic over the spec (no weights are read) and
returns a ``Plan``: ``n_gpu_layers`` and, for the *trunk* (the device running layers
``[0, n_gpu_layers)``) and the *host*, bytes per category (weights, kv, scratch,
expert_cache, reserve), the expert-cache slot count, and per-layer lists. The runtime
allocates exactly the buffers priced here, through ``engine.ledger.Ledger``, so
``Ledger.compare(plan)`` can hold every category to the byte.

Pricing rules (what the runtime must allocate for plan and ledger to agree):
- Weights: every matrix at ``weight_format`` (f32 4 B, f16/bf16 2 B, q8_0 34 B per 32:
  ``engine.qweights``); 1-D norms always f32, and so is a MoE router under q8_0 (which
  experts run hangs on its few bytes; llama.cpp's converters keep it F32 too). One buffer per GGUF tensor (``layer_tensors`` lists them).
  ``token_embd`` lives on the host. The head (``output_norm`` + ``output``; a tied output
  is priced as its own trunk copy) is on the trunk when every layer is there and it fits
  (``head_tier="auto"``), else on the host. With the head on a CUDA trunk, an untied model
  also keeps a trunk copy of ``token_embd`` (``embed_tier="trunk"``, when it fits and
  ``KVBENCH_DECODE_DEVICE_EMBED`` is on: the static decode gathers the token on the device).
  With experts in blocks on the host (``cpu_moe`` > 0) and ``KVBENCH_EMBED_MAPPED`` on (the
  default since its GPU tests passed on the H100, reports/h100-2026-12-05f), no copy:
  the host table is page-locked and the step reads its row over PCIe (``embed_tier="mapped"``).
- MoE trunk layers: router, attention and norms are resident; routed experts stay on the
  host (``layer_expert_bytes``) and stream through the expert cache: three stacked trunk
  buffers gate/up [S, ff, d] and down [S, d, ff]. S = what is left of the budget after
  trunk weights, KV, scratch and reserve, in whole slots, capped at the trunk's expert
  count; packing keeps room for at least ``min_expert_slots`` (default n_experts_used).
- Experts kept in their GGUF blocks (``expert_blocks="q4_0"|"q8_0"``, llama.cpp's placement:
  ``-ngl 99 --n-cpu-moe N``): every layer and the head on the trunk; the routed experts of the
  first ``cpu_moe`` MoE layers live on the host and compute on its CPU (Q4_0 only, repacked
  for torch's CPU int4 matmul, and kept as blocks for large batches: ``cpu_expert_bytes``), those of the other MoE
  layers are resident on the trunk as two buffers per stack (quants and fp16 scales:
  ``expert_block_buffers``), no expert cache. ``cpu_moe="auto"`` (or None) takes the fewest
  that fit the budget with the head on the trunk. ``host_experts="pcie"`` keeps those layers'
  experts on the host as their blocks alone (pinned), read in place by the GPU's kernel over
  PCIe instead of computed by the CPU (any block format); ``"dma"`` keeps them so too and
  copies a token's k chosen experts into one trunk staging stack (scratch item
  ``expert_staging``: ``expert_staging_parts``) before the kernel reads them there. ``Plan.layer_expert_tiers`` says per
  layer where its experts are ("trunk" resident blocks, "cpu" host compute, "pcie" host blocks
  the GPU reads, "dma" host blocks the GPU copies, "cache" streamed to a trunk layer, "host" a tail layer's, "" dense) and
  ``layer_expert_bytes`` their bytes there.
- KV: two buffers per layer (K, V), each ``rows * n_kv_heads * head_dim`` values at
  fp32 4 B, bf16 2 B, q8_0 34 B per 32 (packed blocks), K at the layer's K format and V at
  its V format. ``rows`` is ``ctx``, except on a
  sliding-window layer, whose ring holds ``window + chunk`` rows when that is fewer
  (``engine.kv_ring.layer_kv_rows``; Gemma 3: 512 + 512). ``kv_dtype`` is a KV spec
  (``engine.kv_spec``: one dtype, ``k-<dtype>.v-<dtype>``, per-layer overrides ``<dtype>@<layers>``);
  trunk layer ``i`` gets the spec's (K, V) formats of layer ``i``; host (tail) layers are fp32
  (K and V). ``Plan.layer_k_dtypes`` / ``layer_v_dtypes`` are those formats per layer,
  ``layer_kv_dtypes`` each layer's cell (``kv_spec.layer_label``), ``kv_spec`` the planned
  assignment in canonical form; a layer's ``layer_kv_bytes`` is its K bytes + V bytes (each
  buffer rounded by the allocator on its own). ``Plan.layer_kv_rows`` / ``layer_attention`` and
  ``kv_by_kind()`` show global and sliding-window layers' KV apart.
- Scratch per tier that runs layers: one wave buffer of ``wave_budget_bytes`` plus one
  activation arena of ``activation_bytes``: ``ubatch`` tokens x f32 x (2 d_model +
  2 q_dim + 2 kv_dim + 2 ffn width), ffn width = d_ff or n_experts_used * d_ff_expert,
  plus [ubatch, vocab] logits where the head runs.
- Reserve: ``reserve_bytes`` of headroom on the trunk (planned, never allocated).
- Allocator rounding: ``round_alloc(nbytes, device)``; none on CPU; on CUDA the caching
  allocator rounds every block up to 512 B (with its default config), which is what
  ``torch.cuda.memory_allocated`` counts, so the plan prices each trunk buffer rounded.
  Host numbers are logical bytes (pinned host memory is not rounded here).
- Budget: ``vram_budget`` bytes; None means free CUDA memory (``torch.cuda.mem_get_info``)
  on CUDA, and on CPU a budget that fits everything (all layers, head, every expert).
- Host RAM (``Plan.host_ram``, a ``HostRamPlan``): what the load keeps resident in host
  memory: the host tier's weights (``token_embd``, tail layers, a host head) and every
  routed expert (pinned at its exact size on CUDA: ``engine.hostmem.pinned_empty``), the
  tail's fp32 KV and host scratch, and on a CPU device the trunk too (it is host memory),
  plus ``HOST_HEADROOM`` for the process and the OS. It is held against
  ``engine.hostmem.available()`` (MemAvailable, a cgroup limit, or ``KVBENCH_HOST_RAM``);
  ``host_held`` bytes already resident that this load takes over (``weights_from``) count as
  available. The GGUF's page cache is listed (``page_cache``) but not counted: it is
  reclaimable, and MemAvailable already treats it so. ``require_host_fit(plan)`` raises
  ``OutOfMemoryError`` with the numbers and the fix when it does not fit; ``engine.load``
  calls it before allocating anything.
- Weight format ``"auto"``: f32 when f32's host need is at most half of what is available
  (room for the OS, page cache and a second process), else bf16; ``weight_format`` is then
  the applied format and ``weight_format_requested`` says "auto" (``weight_format_reason``).

    p = plan(spec, kv_dtype="q8_0", ctx=32768, vram_budget=12 << 30, device="cuda")
    p.n_gpu_layers, p.trunk.kv, p.expert_slots, p.to_dict()
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch

from . import formats, kv_spec as kvspec, settings
from .errors import ConfigError, OutOfMemoryError
from .kv_ring import layer_kv_rows
from .spec import ModelSpec

MiB = 1 << 20
GiB = 1 << 30
CATEGORIES = ("weights", "kv", "scratch", "expert_cache", "reserve")
KV_FORMATS = formats.KV_DTYPES               # format facts live in engine.formats
WEIGHT_FORMATS = formats.WEIGHT_FORMATS
WEIGHT_FORMAT_CHOICES = formats.WEIGHT_FORMAT_CHOICES
DEFAULT_WAVE_BUDGET = formats.DEFAULT_WAVE_BUDGET
DEFAULT_RESERVE = formats.DEFAULT_RESERVE
DEFAULT_UBATCH = 512
CUDA_ALLOC_ROUND = formats.CUDA_ALLOC_ROUND
HOST_HEADROOM_MIN = 1 * GiB         # process, libraries, temporary decode chunks
HOST_HEADROOM_FRAC = 0.05           # ... or 5% of the machine's RAM, whichever is larger


def round_alloc(nbytes: int, device: str | torch.device) -> int:
    """Bytes the allocator really takes for a buffer of ``nbytes`` on ``device``."""
    return formats.round_alloc(nbytes, torch.device(device).type)


class WeightTensor(NamedTuple):
    name: str                  # GGUF tensor name
    shape: tuple[int, ...]     # PyTorch order
    kind: str                  # "norm" (f32) | "matrix" (resident) | "router" (a MoE layer's
                               # router: a matrix, f32 under q8_0 weights) | "expert" (routed, host)


def layer_tensors(spec: ModelSpec, i: int) -> list[WeightTensor]:
    """The tensors the runtime keeps for layer ``i`` (llama.cpp names)."""
    d, q, kv, p = spec.d_model, spec.q_dim, spec.kv_dim, f"blk.{i}."
    out = [WeightTensor(p + "attn_norm.weight", (d,), "norm"),
           WeightTensor(p + "attn_q.weight", (q, d), "matrix"),
           WeightTensor(p + "attn_k.weight", (kv, d), "matrix"),
           WeightTensor(p + "attn_v.weight", (kv, d), "matrix"),
           WeightTensor(p + "attn_output.weight", (d, q), "matrix"),
           WeightTensor(p + "ffn_norm.weight", (d,), "norm")]
    if getattr(spec, "post_norms", False):    # Gemma: norms on the attention and FFN outputs
        out += [WeightTensor(p + "post_attention_norm.weight", (d,), "norm"),
                WeightTensor(p + "post_ffw_norm.weight", (d,), "norm")]
    if spec.qk_norm == "head":
        out += [WeightTensor(p + "attn_q_norm.weight", (spec.head_dim,), "norm"),
                WeightTensor(p + "attn_k_norm.weight", (spec.head_dim,), "norm")]
    elif spec.qk_norm == "full":
        out += [WeightTensor(p + "attn_q_norm.weight", (q,), "norm"),
                WeightTensor(p + "attn_k_norm.weight", (kv,), "norm")]
    if i in spec.moe_layers:
        E, ff = spec.n_experts, spec.d_ff_expert
        out += [WeightTensor(p + "ffn_gate_inp.weight", (E, d), "router"),
                WeightTensor(p + "ffn_gate_exps.weight", (E, ff, d), "expert"),
                WeightTensor(p + "ffn_up_exps.weight", (E, ff, d), "expert"),
                WeightTensor(p + "ffn_down_exps.weight", (E, d, ff), "expert")]
    else:
        ff = spec.d_ff
        out += [WeightTensor(p + "ffn_gate.weight", (ff, d), "matrix"),
                WeightTensor(p + "ffn_up.weight", (ff, d), "matrix"),
                WeightTensor(p + "ffn_down.weight", (d, ff), "matrix")]
    return out


def tensor_bytes(t: WeightTensor, weight_format: str) -> int:
    """Logical bytes of one weight tensor as the runtime stores it (norms always f32)."""
    numel = 1
    for s in t.shape:
        numel *= s
    if t.kind == "norm" or (t.kind == "router" and weight_format == "q8_0"):
        return formats.NORM_BYTES * numel
    return formats.weight_format(weight_format).bytes_for(numel, f"{t.name} at {weight_format}")


def expert_shapes(spec: ModelSpec) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of one expert's gate, up, down matrices."""
    d, ff = spec.d_model, spec.d_ff_expert
    return (ff, d), (ff, d), (d, ff)


def expert_matrix_bytes(spec: ModelSpec, weight_format: str) -> list[int]:
    """Logical bytes of one expert's gate, up, down at ``weight_format``."""
    if not spec.is_moe:
        return [0, 0, 0]
    f = formats.weight_format(weight_format)
    return [f.bytes_for(a * b, f"expert matrix at {weight_format}") for a, b in expert_shapes(spec)]


EXPERT_BLOCK_FORMATS = ("q4_0", "q8_0")
HOST_EXPERTS = ("cpu", "pcie", "dma")   # what computes the experts of cpu_moe layers (Plan.host_experts)
STAGING_ALIGN = 256                       # bytes each part of the DMA staging slots starts on


def expert_staging_parts(spec: ModelSpec, fmt: str) -> list[int]:
    """Bytes of the six parts (quants and scales of gate, up, down) of a device staging stack
    for the k experts one token chooses (``host_experts="dma"``), each rounded up to
    ``STAGING_ALIGN`` so the parts can be carved from one buffer."""
    k, E = spec.n_experts_used, spec.n_experts
    return [-(-(b // E * k) // STAGING_ALIGN) * STAGING_ALIGN for b in expert_block_buffers(spec, fmt)]


def expert_block_buffers(spec: ModelSpec, fmt: str) -> list[int]:
    """Logical bytes of one MoE layer's experts kept as ``fmt`` blocks: quants and scales of
    gate, up and down (``engine.kernels.moe_blocks.BlockStack``), six buffers."""
    if fmt not in EXPERT_BLOCK_FORMATS:
        raise ConfigError(f"expert blocks {fmt!r} are not one of {', '.join(EXPERT_BLOCK_FORMATS)}",
                          "keep the experts at the weight format instead (expert_format='weights')")
    out = []
    for a, b in expert_shapes(spec):
        n = spec.n_experts * a * b
        out += [n // 2 if fmt == "q4_0" else n, n // 32 * 2]
    return out


def kv_buffer_bytes(spec: ModelSpec, ctx: int, kv_dtype: str, v_dtype: str | None = None) -> list[int]:
    """Logical bytes of one layer's K and V buffers of ``ctx`` rows: [K, V], K in ``kv_dtype``
    and V in ``v_dtype`` (None: the same)."""
    out = []
    for f in (kv_dtype, v_dtype or kv_dtype):
        formats.check_kv_geometry(f, spec.n_kv_heads, spec.head_dim)
        out.append(ctx * formats.kv_row_bytes(f, spec.n_kv_heads, spec.head_dim))
    return out


def activation_bytes(spec: ModelSpec, ubatch: int, *, layers: bool = True, head: bool = False) -> int:
    """Per-step activation arena for ``ubatch`` tokens (see the module docstring)."""
    ff = max(spec.d_ff, spec.n_experts_used * spec.d_ff_expert)
    per_token = 0
    if layers:
        per_token += 2 * spec.d_model + 2 * spec.q_dim + 2 * spec.kv_dim + 2 * ff
    if head:
        per_token += spec.vocab_size
    return 4 * ubatch * per_token


@dataclass
class TierBytes:
    weights: int = 0
    kv: int = 0
    scratch: int = 0
    expert_cache: int = 0
    reserve: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.scratch + self.expert_cache + self.reserve

    def get(self, category: str) -> int:
        if category not in CATEGORIES:
            raise ConfigError(f"unknown memory category {category!r}", f"use one of {', '.join(CATEGORIES)}")
        return getattr(self, category)


@dataclass
class HostRamPlan:
    """Host memory the plan keeps resident, against what the machine has available."""
    weights: int = 0            # host-tier matrices and norms (token_embd, tail layers, host head)
    experts: int = 0            # routed experts of every MoE layer (pinned on CUDA)
    kv: int = 0                 # tail layers' fp32 KV
    scratch: int = 0            # host scratch
    trunk: int = 0              # the trunk itself when the device is the CPU (minus its reserve)
    headroom: int = 0           # kept free for the process and the OS
    page_cache: int = 0         # the GGUF file's pages (reclaimable; listed, not counted)
    held: int = 0               # already resident and taken over (weights_from)
    available: int = 0          # engine.hostmem.available() when planned
    total: int = 0              # the machine's RAM (MemTotal or the override)
    source: str = ""            # where ``available`` came from

    @property
    def need(self) -> int:
        return self.weights + self.experts + self.kv + self.scratch + self.trunk + self.headroom

    @property
    def fits(self) -> bool:
        return self.need <= self.available + self.held

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(need=self.need, fits=self.fits)
        return d


@dataclass
class Plan:
    model: str
    arch: str
    device: str
    n_layers: int
    n_gpu_layers: int
    ctx: int
    kv_dtype: str                       # requested KV spec (engine.kv_spec); applies to trunk layers only
    weight_format: str
    budget_bytes: int
    budget_source: str                  # "vram_budget" | "cuda free" | "cpu default (fits all)"
    wave_budget_bytes: int
    ubatch: int
    head_tier: str                      # "trunk" | "host"
    trunk: TierBytes
    host: TierBytes
    expert_slots: int                   # slots in the trunk expert cache
    expert_slot_bytes: int              # one expert's gate+up+down (logical bytes)
    trunk_experts: int                  # routed experts of trunk layers (max useful slots)
    layer_tiers: list[str] = field(default_factory=list)
    layer_kv_dtypes: list[str] = field(default_factory=list)     # per layer: kv_spec.layer_label(K, V)
    layer_k_dtypes: list[str] = field(default_factory=list)      # K format per layer
    layer_v_dtypes: list[str] = field(default_factory=list)      # V format per layer
    kv_spec: str = ""                   # the planned per-layer K/V formats, canonical (kv_spec.KVSpec.from_layers)
    layer_kv_bytes: list[int] = field(default_factory=list)       # K+V on the layer's tier
    layer_kv_rows: list[int] = field(default_factory=list)        # ctx, or the ring of a SWA layer
    layer_attention: list[str] = field(default_factory=list)      # "global" | "swa"
    layer_weight_bytes: list[int] = field(default_factory=list)   # non-expert weights, layer's tier
    layer_expert_bytes: list[int] = field(default_factory=list)   # routed experts, where they live
    scratch_items: dict[str, int] = field(default_factory=dict)   # trunk scratch buffers
    weight_format_requested: str = ""   # "auto" or the format asked for
    weight_format_reason: str = ""      # why "auto" chose ``weight_format``
    host_ram: HostRamPlan = field(default_factory=HostRamPlan)
    embed_tier: str = "host"            # "trunk": a device copy of token_embd too (static decode);
                                        # "mapped": the host table page-locked, read over PCIe
    expert_format: str = "weights"      # "weights" (the weight format) | "q4_0" | "q8_0" (GGUF blocks kept)
    cpu_moe: int = 0                    # MoE layers whose experts compute on the host CPU (blocks mode)
    cpu_moe_requested: str = ""         # "auto" or the count asked for; "" outside blocks mode
    host_experts: str = "cpu"           # what computes the cpu_moe layers' experts: "cpu" (the host's
                                        # int4 matmul) | "pcie" (the GPU, reading their blocks in place)
                                        # | "dma" (the GPU, from a staging copy of the k chosen)
    host_experts_requested: str = ""    # "auto" when engine.load measured which (engine.host_probe)
    host_experts_reason: str = ""       # why "auto" chose ``host_experts``, with the numbers
    layer_expert_tiers: list[str] = field(default_factory=list)  # "trunk"|"cpu"|"cache"|"host"|"" per layer

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.trunk.total

    def tier(self, name: str) -> TierBytes:
        if name not in ("trunk", "host"):
            raise ConfigError(f"unknown tier {name!r}", "use 'trunk' or 'host'")
        return getattr(self, name)

    def kv_by_kind(self) -> dict[str, dict]:
        """KV of global vs sliding-window layers: {kind: {layers, rows, bytes, trunk, host}}
        (``rows``: the distinct row counts); only the kinds the model has."""
        out: dict[str, dict] = {}
        for i, kind in enumerate(self.layer_attention):
            k = out.setdefault(kind, {"layers": 0, "rows": [], "bytes": 0, "trunk": 0, "host": 0})
            k["layers"] += 1
            k["bytes"] += self.layer_kv_bytes[i]
            k[self.layer_tiers[i]] += self.layer_kv_bytes[i]
            if self.layer_kv_rows[i] not in k["rows"]:
                k["rows"].append(self.layer_kv_rows[i])
        return {kind: out[kind] for kind in ("global", "swa") if kind in out}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["free_bytes"] = self.free_bytes
        d["kv_by_kind"] = self.kv_by_kind()
        d["host_ram"] = self.host_ram.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["trunk"], kw["host"] = TierBytes(**d["trunk"]), TierBytes(**d["host"])
        if isinstance(d.get("host_ram"), dict):      # plans written before host RAM have none
            hnames = {f.name for f in fields(HostRamPlan)}
            kw["host_ram"] = HostRamPlan(**{k: v for k, v in d["host_ram"].items() if k in hnames})
        return cls(**kw)


def _mib(n: int) -> str:
    return f"{n / MiB:.2f} MiB"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def check_q8_weights(spec: ModelSpec, expert_blocks: str | None) -> None:
    """What Q8_0 matrices (``engine.qweights``) need, else a ConfigError naming it: rows of
    whole 32-value blocks, and a MoE model's routed experts kept in the file's blocks (the
    engine has no Q8_0 path for stacked experts)."""
    if spec.is_moe and expert_blocks is None:
        raise ConfigError(f"weight_format q8_0 stores {spec.name}'s routed experts only in the file's blocks",
                          "pass expert_format='blocks' (--expert-format blocks), or weight_format f32/bf16/f16")
    ks = {"d_model": spec.d_model, "q_dim": spec.q_dim, **({"d_ff": spec.d_ff} if spec.d_ff else {})}
    for name, k in ks.items():
        if k % formats.Q8_BLOCK:
            raise ConfigError(f"weight_format q8_0: {spec.name}'s matrix rows of {name}={k} values are not "
                              f"whole {formats.Q8_BLOCK}-value blocks", "use weight_format f32, bf16 or f16")


def plan(spec: ModelSpec, *, kv_dtype: str = "fp32", ctx: int = 4096, vram_budget: int | None = None,
         n_gpu_layers: int | None = None, wave_budget_bytes: int = DEFAULT_WAVE_BUDGET,
         weight_format: str = "f32", reserve_bytes: int = DEFAULT_RESERVE,
         device: str | torch.device | None = None, ubatch: int = DEFAULT_UBATCH,
         head_tier: str = "auto", min_expert_slots: int | None = None,
         host_ram: int | None = None, host_held: int = 0, file_bytes: int = 0,
         expert_blocks: str | None = None, cpu_moe: int | str | None = None, host_experts: str = "cpu") -> Plan:
    """Price a layer split and its host RAM; see the module docstring for the rules.

    ``host_ram``: bytes of host memory available (None: ``engine.hostmem.available()``);
    ``host_held``: bytes already resident that this load takes over; ``file_bytes``: the
    GGUF's size (its page cache, listed in ``host_ram``). ``expert_blocks``: the GGUF's expert
    block format when experts stay in it (then ``cpu_moe``: a count or "auto", module docstring). ``weight_format="auto"`` picks f32
    or bf16 (module docstring). The plan records whether the host fits; it does not raise
    for host RAM (``require_host_fit`` does), so what-if plans stay possible."""
    if weight_format not in WEIGHT_FORMAT_CHOICES:
        raise ConfigError(f"weight_format {weight_format!r} is not one of {', '.join(WEIGHT_FORMAT_CHOICES)}",
                          "pick one of those")
    if weight_format == "q8_0":
        check_q8_weights(spec, expert_blocks)
    if host_experts == "auto":
        raise ConfigError("host_experts 'auto' is decided by engine.load, which measures this machine's CPU and "
                          "PCIe (engine.host_probe); a plan needs the placement itself",
                          "plan with host_experts 'cpu' or 'pcie' (or load with 'auto' and read eng.plan)")
    if host_experts != "cpu" and expert_blocks is None:
        raise ConfigError(f"host_experts {host_experts!r} places the experts of cpu_moe layers, which needs them "
                          "in the file's blocks", "pass expert_format='blocks' (--expert-format blocks)")
    from . import hostmem
    if host_ram is None:
        ram = hostmem.available()
    else:
        if not isinstance(host_ram, int) or host_ram <= 0:
            raise ConfigError(f"host_ram {host_ram!r} must be a positive byte count")
        ram = hostmem.HostRam(host_ram, host_ram, "host_ram argument")
    kw = dict(kv_dtype=kv_dtype, ctx=ctx, vram_budget=vram_budget, n_gpu_layers=n_gpu_layers,
              wave_budget_bytes=wave_budget_bytes, reserve_bytes=reserve_bytes, device=device,
              ubatch=ubatch, head_tier=head_tier, min_expert_slots=min_expert_slots,
              expert_blocks=expert_blocks, cpu_moe=cpu_moe, host_experts=host_experts)

    def priced(fmt: str) -> Plan:
        p = _plan(spec, weight_format=fmt, **kw)
        p.weight_format_requested = weight_format
        _price_host(p, ram, host_held, file_bytes)
        return p

    if weight_format != "auto":
        return priced(weight_format)
    try:
        f32 = priced("f32")
    except OutOfMemoryError:         # f32 does not fit the device budget; bf16 may
        f32 = None
    if f32 is not None and f32.host_ram.need <= (ram.bytes + host_held) // 2:
        f32.weight_format_reason = (f"f32 needs {_gib(f32.host_ram.need)} of host RAM, at most half of the "
                                    f"{_gib(ram.bytes + host_held)} available")
        return f32
    p = priced("bf16")
    p.weight_format_reason = ("f32 does not fit the device budget" if f32 is None else
                              f"f32 would need {_gib(f32.host_ram.need)} of host RAM, more than half of the "
                              f"{_gib(ram.bytes + host_held)} available ({ram.source})")
    return p


def _price_host(p: Plan, ram, held: int, file_bytes: int) -> None:
    tiers = p.layer_expert_tiers or [""] * len(p.layer_expert_bytes)
    experts = sum(b for b, t in zip(p.layer_expert_bytes, tiers) if t != "trunk")
    trunk_on_host = p.trunk.total - p.trunk.reserve if torch.device(p.device).type == "cpu" else 0
    p.host_ram = HostRamPlan(
        weights=p.host.weights - experts, experts=experts, kv=p.host.kv, scratch=p.host.scratch,
        trunk=trunk_on_host, headroom=max(HOST_HEADROOM_MIN, int(HOST_HEADROOM_FRAC * ram.total)),
        page_cache=int(file_bytes or 0), held=int(held or 0), available=ram.bytes, total=ram.total,
        source=ram.source)


def require_host_fit(p: Plan) -> None:
    """Raise ``OutOfMemoryError`` (one line: the parts, what is available, the fix) when the
    plan's host RAM does not fit; see the module docstring."""
    h = p.host_ram
    if h.fits:
        return
    parts = [f"{name} {_gib(v)}" for name, v in (("weights", h.weights), ("routed experts", h.experts),
                                                 ("tail KV", h.kv), ("host scratch", h.scratch),
                                                 ("trunk on the CPU", h.trunk)) if v]
    have = f"{_gib(h.available)} available ({h.source})" + (f" + {_gib(h.held)} taken over" if h.held else "")
    fixes = []
    if p.weight_format == "f32":
        fixes.append("--weight-format bf16 (half the bytes)")
    if h.kv or h.trunk:
        fixes.append("a smaller --ctx")
    fixes.append("a machine with more RAM")
    vouch = ("raise KVBENCH_HOST_RAM if this machine has more" if h.source == "KVBENCH_HOST_RAM" else
             f"if {h.source} under-reports this machine, set KVBENCH_HOST_RAM=<size> to vouch for it")
    raise OutOfMemoryError(
        f"host RAM: {p.model} with {p.weight_format} weights on {p.device} needs {_gib(h.need)} resident "
        f"({' + '.join(parts)} + headroom {_gib(h.headroom)}) but {have}",
        f"use {', or '.join(fixes)}; {vouch}")


def _plan(spec: ModelSpec, *, kv_dtype: str, ctx: int, vram_budget: int | None,
          n_gpu_layers: int | None, wave_budget_bytes: int, weight_format: str, reserve_bytes: int,
          device: str | torch.device | None, ubatch: int, head_tier: str,
          min_expert_slots: int | None, expert_blocks: str | None = None,
          cpu_moe: int | str | None = None, host_experts: str = "cpu") -> Plan:
    """The split and the device/host bytes at one concrete weight format."""
    try:
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device", "use 'cpu' or 'cuda'") from None
    if weight_format not in WEIGHT_FORMATS:
        raise ConfigError(f"weight_format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}",
                          "pick one of those")
    for name, value in (("ctx", ctx), ("ubatch", ubatch)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} {value!r} must be a positive integer")
    for name, value in (("wave_budget_bytes", wave_budget_bytes), ("reserve_bytes", reserve_bytes)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} {value!r} must be a non-negative integer")
    if head_tier not in ("auto", "host"):
        raise ConfigError(f"head_tier {head_tier!r} must be 'auto' or 'host'")
    L = spec.n_layers
    if n_gpu_layers is not None and not (isinstance(n_gpu_layers, int) and 0 <= n_gpu_layers <= L):
        raise ConfigError(f"n_gpu_layers {n_gpu_layers!r} must be an integer in [0, {L}]",
                          f"pass 0..{L}, or None to fit as many as the budget holds")
    rnd = lambda n: round_alloc(n, dev)  # noqa: E731

    # only narrowed (trunk) layers are held to the dtype's geometry
    narrowed = n_gpu_layers != 0
    kv_rows = [layer_kv_rows(spec, i, ctx) for i in range(L)]
    wanted = kvspec.parse(kv_dtype).layer_formats(L, spec.name)     # (K, V) per layer, range-checked
    priced = wanted if narrowed else [("fp32", "fp32")] * L
    if settings.get("KVBENCH_FAULT") == ("kv_priced_fp32", None):
        priced = [("fp32", "fp32")] * L   # the seed's planner bug, on purpose: the harness must catch it
    kv_trunk = [sum(rnd(b) for b in kv_buffer_bytes(spec, r, *priced[i])) for i, r in enumerate(kv_rows)]
    kv_host = [sum(kv_buffer_bytes(spec, r, "fp32")) for r in kv_rows]
    w_trunk, w_host, w_expert = [], [], []
    for i in range(L):
        ts = layer_tensors(spec, i)
        resident = [tensor_bytes(t, weight_format) for t in ts if t.kind != "expert"]
        w_trunk.append(sum(rnd(b) for b in resident))
        w_host.append(sum(resident))
        w_expert.append(sum(tensor_bytes(t, weight_format) for t in ts if t.kind == "expert"))
    embd_bytes = formats.weight_format(weight_format).bytes_for(spec.vocab_size * spec.d_model,
                                                               f"token_embd/output at {weight_format}")
    head_bytes = [4 * spec.d_model, embd_bytes]           # output_norm, output [vocab, d]
    slot_parts = expert_matrix_bytes(spec, weight_format)
    slot_bytes = sum(slot_parts)
    moe = set(spec.moe_layers)
    n_min = spec.n_experts_used if min_expert_slots is None else int(min_expert_slots)

    def trunk_experts(k: int) -> int:
        return spec.n_experts * sum(1 for i in range(k) if i in moe)

    def cache_bytes(slots: int) -> int:
        return sum(rnd(slots * b) for b in slot_parts)

    def scratch_items(k: int, head: bool) -> dict[str, int]:
        if k == 0:
            return {}
        return {"wave": rnd(wave_budget_bytes), "activations": rnd(activation_bytes(spec, ubatch, head=head))}

    def trunk_cost(k: int, head: bool, slots: int) -> TierBytes:
        return TierBytes(weights=sum(w_trunk[:k]) + (sum(rnd(b) for b in head_bytes) if head else 0),
                         kv=sum(kv_trunk[:k]), scratch=sum(scratch_items(k, head).values()),
                         expert_cache=cache_bytes(slots), reserve=reserve_bytes)

    def min_slots(k: int) -> int:
        return min(n_min, trunk_experts(k))

    can_head = head_tier == "auto"
    if vram_budget is not None:
        if not isinstance(vram_budget, int) or vram_budget < 0:
            raise ConfigError(f"vram_budget {vram_budget!r} must be a non-negative byte count")
        budget, source = vram_budget, "vram_budget"
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {dev} has no CUDA here to read free memory from",
                              "pass vram_budget (--vram-budget) to simulate a card, or use device='cpu'")
        budget, source = int(torch.cuda.mem_get_info(dev)[0]), "cuda free"
    else:
        budget = trunk_cost(L, can_head, trunk_experts(L)).total
        source = "cpu default (fits all)"

    essentials = reserve_bytes + sum(scratch_items(1, False).values())
    if budget < essentials and n_gpu_layers != 0:
        raise OutOfMemoryError(
            f"vram budget {_mib(budget)} is below the trunk's essentials: reserve {_mib(reserve_bytes)} "
            f"+ scratch {_mib(essentials - reserve_bytes)} (wave {_mib(wave_budget_bytes)} + activations "
            f"for {ubatch} tokens) = {_mib(essentials)}",
            f"raise --vram-budget to at least {_mib(essentials)}, lower the wave budget or reserve, "
            f"or pass --n-gpu-layers 0")

    if expert_blocks is not None or cpu_moe is not None:
        return _plan_blocks(spec, dev, budget, source, dict(
            rnd=rnd, trunk_cost=trunk_cost, scratch_items=scratch_items, w_trunk=w_trunk, kv_trunk=kv_trunk,
            kv_rows=kv_rows, wanted=wanted, embd_bytes=embd_bytes, slot_bytes=slot_bytes, moe=moe),
            expert_blocks=expert_blocks, cpu_moe=cpu_moe, host_experts=host_experts, n_gpu_layers=n_gpu_layers,
            kv_dtype=kv_dtype,
            ctx=ctx, weight_format=weight_format, wave_budget_bytes=wave_budget_bytes, ubatch=ubatch)

    fit = 0
    for k in range(1, L + 1):
        if trunk_cost(k, False, min_slots(k)).total > budget:
            break
        fit = k
    k = fit if n_gpu_layers is None else n_gpu_layers
    if k > fit:
        need = trunk_cost(k, False, min_slots(k))
        raise OutOfMemoryError(
            f"n_gpu_layers={k} needs {_mib(need.total)} on the trunk (weights {_mib(need.weights)} + "
            f"kv {kv_dtype} {_mib(need.kv)} + scratch {_mib(need.scratch)} + expert cache "
            f"{_mib(need.expert_cache)} + reserve {_mib(need.reserve)}) but the budget is {_mib(budget)}",
            f"use --n-gpu-layers {fit} (the most that fit) or raise --vram-budget")
    head_on_trunk = (can_head and k == L and L > 0
                     and trunk_cost(k, True, min_slots(k)).total <= budget)
    # static decode gathers the token's embedding on the device: an untied model on CUDA keeps
    # a trunk copy of token_embd when it fits beside the head (a tied head's output is that copy)
    embed_copy = rnd(embd_bytes) if (head_on_trunk and dev.type == "cuda" and not spec.tied_output
                                     and settings.get("KVBENCH_DECODE_DEVICE_EMBED")) else 0
    if embed_copy and trunk_cost(k, True, min_slots(k)).total + embed_copy > budget:
        embed_copy = 0
    base = trunk_cost(k, head_on_trunk, 0)
    left = budget - base.total - embed_copy
    slots = min(trunk_experts(k), max(left, 0) // slot_bytes) if slot_bytes else 0
    while slots > 0 and cache_bytes(slots) > left:
        slots -= 1
    trunk = trunk_cost(k, head_on_trunk, slots)    # k == 0: the reserve alone
    trunk.weights += embed_copy

    tail = range(k, L)
    host_runs = len(tail) > 0
    host_scratch = ((wave_budget_bytes if host_runs else 0)
                    + activation_bytes(spec, ubatch, layers=host_runs, head=not head_on_trunk))
    # a tied head on the host reads token_embd itself: only output_norm is extra
    host_head = 0 if head_on_trunk else head_bytes[0] + (0 if spec.tied_output else head_bytes[1])
    host = TierBytes(
        weights=embd_bytes + host_head + sum(w_host[i] for i in tail) + sum(w_expert),
        kv=sum(kv_host[i] for i in tail), scratch=host_scratch)
    trunk_layers = range(k)
    applied = [wanted[i] if i in trunk_layers else ("fp32", "fp32") for i in range(L)]
    return Plan(
        model=spec.name, arch=spec.arch, device=str(dev), n_layers=L, n_gpu_layers=k, ctx=ctx,
        kv_dtype=kv_dtype, weight_format=weight_format, budget_bytes=budget, budget_source=source,
        wave_budget_bytes=wave_budget_bytes, ubatch=ubatch,
        head_tier="trunk" if head_on_trunk else "host", trunk=trunk, host=host,
        expert_slots=slots, expert_slot_bytes=slot_bytes, trunk_experts=trunk_experts(k),
        layer_tiers=["trunk" if i in trunk_layers else "host" for i in range(L)],
        layer_kv_dtypes=[kvspec.layer_label(*a) for a in applied],
        layer_k_dtypes=[a[0] for a in applied], layer_v_dtypes=[a[1] for a in applied],
        kv_spec=str(kvspec.KVSpec.from_layers(applied)),
        layer_kv_bytes=[kv_trunk[i] if i in trunk_layers else kv_host[i] for i in range(L)],
        layer_kv_rows=kv_rows,
        layer_attention=["swa" if spec.window(i) else "global" for i in range(L)],
        layer_weight_bytes=[w_trunk[i] if i in trunk_layers else w_host[i] for i in range(L)],
        layer_expert_bytes=w_expert,
        layer_expert_tiers=[("cache" if i in trunk_layers else "host") if i in moe else "" for i in range(L)],
        scratch_items=scratch_items(k, head_on_trunk),
        embed_tier="trunk" if embed_copy else "host",
    )


def decode_read_bytes(p: Plan, spec: ModelSpec, depth: int) -> dict:
    """Bytes one decode token reads with ``depth`` positions already cached, by where and what:
    a roofline's numerator (bandwidth / bytes = the step's ceiling in tokens a second).

    ``{"depth", "trunk": {...}, "host": {...}}``, each part's bytes: ``weights`` (every matrix,
    norm and router of the layers there, at the plan's weight format), ``experts`` (the k routed
    experts a MoE layer runs: at the weight format, as the file's blocks on the trunk, packed
    for the CPU's int4 matmul on the host, or the host's blocks the GPU reads over PCIe), ``kv`` (K and V of the positions attended, a
    sliding-window layer's window at most), ``head`` (output norm and matrix) and ``embed`` (one
    row), and ``total``. Logical bytes of what is read, not what is allocated; a layer on the
    host tier (the layer split's tail) counts on the host. An expert cache's misses are not
    counted: with every hit they cost nothing, a miss adds one expert's copy."""
    if not isinstance(depth, int) or depth < 0:
        raise ConfigError(f"depth {depth!r} must be a non-negative integer")
    parts = {t: {"weights": 0, "experts": 0, "kv": 0, "head": 0, "embed": 0} for t in ("trunk", "host")}
    wf, k = p.weight_format, spec.n_experts_used
    for i in range(spec.n_layers):
        tier = p.layer_tiers[i] if p.layer_tiers else "trunk"
        ts = layer_tensors(spec, i)
        parts[tier]["weights"] += sum(tensor_bytes(t, wf) for t in ts if t.kind != "expert")
        if i in spec.moe_layers:
            where = p.layer_expert_tiers[i] if p.layer_expert_tiers else ""
            if where == "cpu":
                parts["host"]["experts"] += int4_packed_bytes(k, spec.d_ff_expert, spec.d_model)
            elif where in ("pcie", "dma"):  # host memory, read by the GPU over PCIe (in place / copied)
                parts["host"]["experts"] += k * sum(expert_block_buffers(spec, p.expert_format)) // spec.n_experts
            elif p.expert_format != "weights":
                parts[tier]["experts"] += k * sum(expert_block_buffers(spec, p.expert_format)) // spec.n_experts
            else:
                parts[tier]["experts"] += k * sum(expert_matrix_bytes(spec, wf))
        window = spec.window(i)
        rows = min(depth, window) if window else depth
        kf = p.layer_k_dtypes[i] if p.layer_k_dtypes else "fp32"
        vf = p.layer_v_dtypes[i] if p.layer_v_dtypes else kf
        parts[tier]["kv"] += sum(kv_buffer_bytes(spec, rows, kf, vf))
    head = "trunk" if p.head_tier == "trunk" else "host"
    parts[head]["head"] = formats.NORM_BYTES * spec.d_model + formats.weight_format(wf).bytes_for(
        spec.vocab_size * spec.d_model)
    parts["trunk" if p.embed_tier == "trunk" else "host"]["embed"] = formats.weight_format(wf).bytes_for(spec.d_model)
    for part in parts.values():
        part["total"] = sum(part.values())
    return {"depth": depth, **parts}


def cpu_expert_bytes(spec: ModelSpec) -> int:
    """Host bytes of one MoE layer's experts on the CPU: packed for the CPU int4 matmul (4 bits
    a value and a bf16 (scale, zero) pair per 32 values, ``engine.cpu_experts.packed_bytes``)
    plus the Q4_0 blocks themselves (quants and scales), which a large batch reads on the
    device (``engine.model.CpuExperts.on_device``)."""
    return int4_packed_bytes(spec.n_experts, spec.d_ff_expert, spec.d_model) + sum(expert_block_buffers(spec, "q4_0"))


def int4_packed_bytes(n_experts: int, ff: int, d: int) -> int:
    """Host bytes of ``n_experts`` experts packed for torch's CPU int4 matmul: 4 bits a value
    and a bf16 (scale, zero) pair per 32 values, for gate+up [2 ff, d] and down [d, ff] each."""
    values = 3 * ff * d
    return n_experts * (values // 2 + values // 32 * 4)


def _plan_blocks(spec: ModelSpec, dev: torch.device, budget: int, source: str, c: dict, *,
                 expert_blocks: str | None, cpu_moe, n_gpu_layers, kv_dtype: str, ctx: int,
                 weight_format: str, wave_budget_bytes: int, ubatch: int, host_experts: str = "cpu") -> Plan:
    """The blocks placement (module docstring): every layer and the head on the trunk, experts of
    the first ``cpu_moe`` MoE layers on the host CPU, the others resident in blocks."""
    L, rnd, moe = spec.n_layers, c["rnd"], c["moe"]
    if expert_blocks is None:
        raise ConfigError("cpu_moe computes experts from their GGUF blocks; the experts are kept at the "
                          "weight format", "pass expert_format='blocks' (--expert-format blocks)")
    if not moe:
        raise ConfigError(f"{spec.name} has no routed experts to keep in blocks",
                          "drop expert_format='blocks' (--expert-format)")
    if n_gpu_layers not in (None, L):
        raise ConfigError(f"experts in blocks keep all {L} layers on the trunk (llama.cpp's -ngl 99 "
                          f"--n-cpu-moe N); n_gpu_layers={n_gpu_layers} asks otherwise",
                          f"drop n_gpu_layers (or pass {L}) and size the split with cpu_moe")
    if host_experts not in HOST_EXPERTS:
        raise ConfigError(f"host_experts {host_experts!r} is not one of {', '.join(HOST_EXPERTS)}",
                          "cpu: the host's int4 matmul; pcie: the GPU reads the host's blocks in place")
    gpu_layer = sum(rnd(b) for b in expert_block_buffers(spec, expert_blocks))
    # on the host: packed for its int4 matmul plus the blocks (cpu), or the blocks alone (pcie)
    host_layer = cpu_expert_bytes(spec) if host_experts == "cpu" else sum(expert_block_buffers(spec, expert_blocks))
    # dma: one staging stack on the trunk for the k experts a token chooses (shared by the layers)
    staging = sum(expert_staging_parts(spec, expert_blocks)) if host_experts == "dma" else 0
    order = sorted(moe)
    requested = "auto" if cpu_moe in (None, "auto") else cpu_moe
    if requested != "auto" and (isinstance(requested, bool) or not isinstance(requested, int)
                                or not 0 <= requested <= len(order)):
        raise ConfigError(f"cpu_moe {cpu_moe!r} must be 'auto' or an integer in [0, {len(order)}] "
                          f"(the MoE layers of {spec.name})", f"pass 0..{len(order)} or 'auto'")
    if requested not in ("auto", 0) and expert_blocks != "q4_0" and host_experts == "cpu":
        raise ConfigError(f"cpu_moe={requested}: the CPU computes experts from Q4_0 blocks, this file's "
                          f"are {expert_blocks}", "pass cpu_moe=0 (every expert on the trunk)")
    base = c["trunk_cost"](L, True, 0)

    def need(n: int) -> int:
        return base.total + gpu_layer * (len(order) - n) + (rnd(staging) if n else 0)
    counts = range(len(order) + 1) if expert_blocks == "q4_0" or host_experts != "cpu" else range(1)
    fewest = next((n for n in counts if need(n) <= budget), None)
    n = fewest if requested == "auto" else requested
    if n is None:
        raise OutOfMemoryError(
            f"experts in {expert_blocks} blocks: even with every MoE layer's experts on the CPU the trunk "
            f"needs {_mib(base.total)} (attention, norms, head, KV {kv_dtype}, scratch, reserve) but the "
            f"budget is {_mib(budget)}", "raise --vram-budget, or use a smaller --ctx")
    if need(n) > budget:
        raise OutOfMemoryError(
            f"cpu_moe={n}: the trunk needs {_mib(need(n))} ({_mib(base.total)} of attention, norms, head, KV "
            f"{kv_dtype}, scratch and reserve + the experts of {len(order) - n} layers at {_mib(gpu_layer)} "
            f"each) but the budget is {_mib(budget)}",
            f"use cpu_moe={fewest} (--cpu-moe {fewest}), the fewest that fit, or raise --vram-budget")
    cpu_layers = set(order[:n])
    trunk = c["trunk_cost"](L, True, 0)
    trunk.weights += gpu_layer * (len(order) - n)
    scratch_items = c["scratch_items"](L, True)
    if staging and n:
        scratch_items["expert_staging"] = rnd(staging)
        trunk.scratch += rnd(staging)
    # the static decode's embedding row: with experts on the host, read from the host table in
    # place over PCIe (page-locked, "mapped"), as llama.cpp keeps token_embd on the host, so the
    # VRAM a trunk copy would take holds experts; else a trunk copy when it fits
    device_embed = dev.type == "cuda" and not spec.tied_output and settings.get("KVBENCH_DECODE_DEVICE_EMBED")
    mapped = bool(device_embed and n and settings.get("KVBENCH_EMBED_MAPPED"))
    embed_copy = rnd(c["embd_bytes"]) if device_embed and not mapped else 0
    if embed_copy and trunk.total + embed_copy > budget:
        embed_copy = 0
    trunk.weights += embed_copy
    host = TierBytes(weights=c["embd_bytes"] + host_layer * n)
    applied = c["wanted"]
    off = host_experts                      # the tier name: "cpu", "pcie" or "dma"
    tiers = [(off if i in cpu_layers else "trunk") if i in moe else "" for i in range(L)]
    return Plan(
        model=spec.name, arch=spec.arch, device=str(dev), n_layers=L, n_gpu_layers=L, ctx=ctx,
        kv_dtype=kv_dtype, weight_format=weight_format, budget_bytes=budget, budget_source=source,
        wave_budget_bytes=wave_budget_bytes, ubatch=ubatch, head_tier="trunk", trunk=trunk, host=host,
        expert_slots=0, expert_slot_bytes=c["slot_bytes"], trunk_experts=0,
        layer_tiers=["trunk"] * L,
        layer_kv_dtypes=[kvspec.layer_label(*a) for a in applied],
        layer_k_dtypes=[a[0] for a in applied], layer_v_dtypes=[a[1] for a in applied],
        kv_spec=str(kvspec.KVSpec.from_layers(applied)),
        layer_kv_bytes=list(c["kv_trunk"]), layer_kv_rows=c["kv_rows"],
        layer_attention=["swa" if spec.window(i) else "global" for i in range(L)],
        layer_weight_bytes=list(c["w_trunk"]),
        layer_expert_bytes=[(gpu_layer if t == "trunk" else host_layer) if t else 0 for t in tiers],
        layer_expert_tiers=tiers, scratch_items=scratch_items,
        embed_tier="mapped" if mapped else "trunk" if embed_copy else "host", expert_format=expert_blocks, cpu_moe=n,
        cpu_moe_requested=str(requested), host_experts=host_experts,
    )


# sizes are parsed by engine.settings, model lookup lives in engine.models and the
# `python -m engine plan` command in engine.plan_cli; these names stay importable from here
from .settings import parse_size  # noqa: E402,F401
from .models import file_bytes as model_file_bytes, spec_for as spec_for_model  # noqa: E402,F401
