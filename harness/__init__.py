"""kvbench harness: declarative suites over the engine, results, reports (see DESIGN.md).

Contract: ``suite`` (TOML -> dataclasses, validated), ``checks`` (argmax, coherence,
wave_prefill, vram, throughput), ``runner`` (matrix -> results dir), ``results`` (records,
manifest, summary, merge), ``report`` (markdown + PNGs), ``compare`` (regressions), ``cli``.

    python -m harness run suites/kv_dtype.toml --model smollm2-135m --report
    python -m harness compare results/base results/head
"""
