"""Engine CLI: ``python -m engine {bench,generate,plan} ...``.

Contract: each command is ``add_cli_args(parser)`` + ``main(args) -> int``. Bad input prints
``error: <one line>`` on stderr and exits 2: an ``EngineError``, a command-line value argparse
refuses (``Parser`` prints argparse's message as that one line; counts such as ``--repeats``,
``--prompt-tokens``, ``--max-new-tokens`` and ``--ctx`` must be >= 1), and an ``OSError`` that
is the user's to fix (no permission, read-only or full filesystem, a file where a directory
belongs or the reverse: ``USER_ERRNOS``), named by its path. A closed stdout (``... | head``)
ends the command quietly with exit 141 (128 + SIGPIPE, what a shell reports for a tool that
SIGPIPE ended, e.g. ``yes | head``). Any other exception prints one line plus the path of a
saved traceback and exits 3 (a bug). ``bench`` prints a human table, then one JSON line last.

    python -m engine bench --model smollm2-135m
    python -m engine generate smollm2-135m "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

from .errors import EngineError, out_of_memory


def _plan_for(model, kv_dtype: str, ctx: int, device):
    """The planner's view of a load (metadata only), for an out-of-memory message."""
    try:
        from .models import spec_for
        from .planner import plan
        return plan(spec_for(str(model)), kv_dtype=kv_dtype, ctx=ctx, device=device)
    except Exception:  # noqa: BLE001 - the message then says no plan was made
        return None


def load_explained(model, *, kv_dtype: str, device, ctx: int, weight_format: str = "f32",
                   decode_mode: str | None = None, expert_format: str = "weights", cpu_moe=None,
                   vram_budget: str | None = None, host_experts: str = "cpu"):
    """``engine.load`` where an allocator failure becomes ``OutOfMemoryError`` (exit 2) with
    the planner's numbers and the free memory, instead of a raw torch error (exit 3); then the
    decode mode, if given (a mode that cannot be applied is a ConfigError, exit 2)."""
    import torch

    from . import load
    try:
        from .settings import parse_size
        budget = None if vram_budget is None else parse_size(vram_budget, "--vram-budget")
        eng = load(model, kv_dtype=kv_dtype, device=device, ctx=ctx, weight_format=weight_format,
                   expert_format=expert_format, cpu_moe=cpu_moe, vram_budget=budget, host_experts=host_experts)
    except torch.OutOfMemoryError as exc:
        raise out_of_memory("load", _plan_for(model, kv_dtype, ctx, device), device, exc) from None
    if decode_mode:
        eng.set_decode_mode(decode_mode)
    return eng


class Parser(argparse.ArgumentParser):
    """argparse with the CLI contract's error form: one ``error: ...`` line on stderr, exit 2
    (argparse's default prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def at_least(lo: int):
    """argparse ``type=``: an integer >= ``lo`` (a count such as --repeats or --ctx)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", default="fp32", help="KV cache dtype: fp32, bf16, q8_0, or a KV spec "
                   "(engine.kv_spec: k-q8_0.v-bf16, q8_0.fp32@0,23)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ctx", type=at_least(1), default=4096, help="KV cache capacity in tokens")
    p.add_argument("--weight-format", default="f32", help="matrices stored as f32, bf16, f16 or q8_0 (the file's "
                   "Q8_0 blocks as they are; MoE models need --expert-format blocks)")
    p.add_argument("--decode-mode", default=None,
                   help="auto (CUDA graph on CUDA when possible), eager, static or cuda_graph")
    p.add_argument("--vram-budget", default=None,
                   help="device budget the planner holds the load to, e.g. 12GiB (default: free memory)")
    p.add_argument("--expert-format", default="weights", choices=("weights", "blocks"),
                   help="MoE experts at the weight format, or kept in the file's Q4_0/Q8_0 blocks "
                        "(every layer on --device, no expert cache)")
    p.add_argument("--cpu-moe", type=auto_or_count, default=None,
                   help="with --expert-format blocks: the first N MoE layers' experts compute on the CPU "
                        "(llama.cpp's --n-cpu-moe), or auto: the fewest that fit the device")
    p.add_argument("--host-experts", default="cpu", choices=("cpu", "pcie", "dma", "auto"),
                   help="with --cpu-moe: those experts computed by the host's CPU (int4 matmul), or kept on "
                        "the host as blocks the GPU reads in place over PCIe (pcie), or whose chosen ones it "
                        "copies by DMA (dma), or auto: cpu, pcie or dma, whichever one layer's experts "
                        "measure fastest on this machine at load (the reason is printed and recorded)")


def auto_or_count(text: str):
    """argparse ``type=``: ``auto`` or an integer >= 0 (``--cpu-moe``)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be auto or >= 0, got {value}")
    return value


# -- bench ---------------------------------------------------------------------------------
def bench_add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name or .gguf path")
    _common(p)
    p.add_argument("--prompt-tokens", type=at_least(1), default=512, help="teacher-forced length (pp)")
    p.add_argument("--decode-tokens", type=at_least(1), default=64, help="decode steps timed (tg)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed repeats (median reported)")


DECODE_PREFIX = 16      # tokens prefilled before the timed decode steps


def _sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_main(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=False)
    t0 = time.perf_counter()
    eng = load_explained(args.model, kv_dtype=args.kv_dtype, device=args.device,
                         ctx=max(args.ctx, args.prompt_tokens, DECODE_PREFIX + 1) + args.decode_tokens + 8,
                         weight_format=args.weight_format, decode_mode=args.decode_mode,
                         expert_format=args.expert_format, cpu_moe=args.cpu_moe, vram_budget=args.vram_budget,
                         host_experts=args.host_experts)
    load_s = time.perf_counter() - t0

    question = "What is the capital of France?"
    chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    answer = eng.tokenizer.decode(eng.generate(chat, 48), skip_special_tokens=True).strip()

    vocab = eng.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    # one draw serves both: the first prompt_tokens for pp, a DECODE_PREFIX-token prefix for tg
    drawn = torch.randint(0, vocab, (max(args.prompt_tokens, DECODE_PREFIX + 1),), generator=g).tolist()
    ids = drawn[:args.prompt_tokens]
    eng.logits(ids[:32])  # warm-up
    pp = []
    for _ in range(args.repeats):
        _sync(args.device)
        t = time.perf_counter()
        eng.logits(ids)
        _sync(args.device)
        pp.append(time.perf_counter() - t)
    tg = []
    for _ in range(args.repeats):
        eng.prefill(drawn[:DECODE_PREFIX])
        tok = drawn[DECODE_PREFIX]
        _sync(args.device)
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            tok = int(eng.decode(tok).argmax())
        _sync(args.device)
        tg.append(time.perf_counter() - t)
    pp_s, tg_s = statistics.median(pp), statistics.median(tg)
    result = {
        "model": args.model, "arch": eng.spec.arch, "device": str(eng.device),
        "kv_dtype_requested": args.kv_dtype, "kv_dtypes_applied": sorted(set(eng.kv_dtypes)),
        "kv_spec_applied": eng.kv_spec,
        "load_s": round(load_s, 3), f"logits{args.prompt_tokens}_s": round(pp_s, 3),
        f"pp{args.prompt_tokens}_tok_s": round(args.prompt_tokens / pp_s, 1),
        f"tg{args.decode_tokens}_tok_s": round(args.decode_tokens / tg_s, 2),
        "weight_format": args.weight_format, "decode_path": eng.decode_path,
        "expert_format": eng.plan.expert_format, "cpu_moe": eng.plan.cpu_moe, "host_experts": eng.plan.host_experts,
        "host_experts_reason": eng.plan.host_experts_reason or None,
        "cpu_expert_math": eng.cpu_expert_math,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "answer": answer,
    }
    table = Table(title=f"kvbench engine bench: {args.model} ({eng.spec.arch}, {eng.device}, KV {args.kv_dtype})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("load (s)", f"{load_s:.2f}")
    table.add_row(f"teacher-forced logits, {args.prompt_tokens} tokens (s, median of {args.repeats})", f"{pp_s:.2f}")
    table.add_row(f"prefill pp{args.prompt_tokens} (tok/s)", f"{args.prompt_tokens / pp_s:.1f}")
    table.add_row(f"greedy decode tg{args.decode_tokens} (tok/s, median of {args.repeats})", f"{args.decode_tokens / tg_s:.2f}")
    table.add_row("KV dtype applied", eng.kv_spec)
    table.add_row("decode path", f"{eng.decode_path} ({eng.decode_path_reason})")
    if eng.plan.expert_format != "weights":
        table.add_row("experts", f"{eng.plan.expert_format} blocks, {eng.plan.cpu_moe} MoE layers' experts on the host "
                      f"({eng.plan.host_experts})"
                      + (f" ({eng.cpu_expert_math})" if eng.cpu_expert_math else "")
                      + (f"; {eng.plan.host_experts_reason}" if eng.plan.host_experts_reason else ""))
    con.print(table)
    con.print(f"[bold]Q:[/bold] {question}\n[bold]A:[/bold] {answer}")
    print(json.dumps(result))
    return 0


# -- generate -------------------------------------------------------------------------------
def generate_add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registry name or .gguf path")
    p.add_argument("prompt", help="user message (sent through the model's chat template)")
    _common(p)
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--raw", action="store_true", help="skip the chat template")


def generate_main(args) -> int:
    eng = load_explained(args.model, kv_dtype=args.kv_dtype, device=args.device, ctx=args.ctx,
                         weight_format=args.weight_format, decode_mode=args.decode_mode,
                         expert_format=args.expert_format, cpu_moe=args.cpu_moe, vram_budget=args.vram_budget,
                         host_experts=args.host_experts)
    if args.raw:
        ids = eng.tokenizer.encode(args.prompt, add_special_tokens=True)
    else:
        ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    out = eng.generate(ids, args.max_new_tokens)   # out of memory: the engine raises its own error
    print(eng.tokenizer.decode(out, skip_special_tokens=True))
    return 0


COMMANDS = {
    "bench": (bench_add_cli_args, bench_main, "load, a greedy chat answer, prefill and decode throughput"),
    "generate": (generate_add_cli_args, generate_main, "greedy answer to one chat message"),
}


def _register_plan() -> None:
    from . import plan_cli
    COMMANDS["plan"] = (plan_cli.add_cli_args, plan_cli.main, "print the memory plan (metadata only)")


def build_parser() -> argparse.ArgumentParser:
    _register_plan()
    parser = Parser(prog="python -m engine", description="kvbench reference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run)
    return parser


# errno values that are the user's to fix (a path, a permission, a full disk), not a bug
USER_ERRNOS = {
    errno.EACCES: "check its permissions or choose a path you can write",
    errno.EPERM: "check its permissions or choose a path you can write",
    errno.EROFS: "the filesystem is read-only: choose a path on a writable one",
    errno.ENOSPC: "the filesystem is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    errno.EFBIG: "the file is too large for its filesystem: write elsewhere",
    errno.EISDIR: "a directory is in the way: pass a file path",
    errno.ENOTDIR: "a file is in the way where a directory is needed: pass another path",
    errno.EEXIST: "something already exists at that path: pass another path",
    errno.ENAMETOOLONG: "shorten the path",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError`` in ``USER_ERRNOS``: the path, the system's words, the fix."""
    path = exc.filename if exc.filename is not None else exc.filename2
    where = f"{os.fsdecode(path)}: " if path is not None else ""
    words, fix = exc.strerror or os.strerror(exc.errno), USER_ERRNOS[exc.errno]
    if exc.errno == errno.EEXIST and path is not None and os.path.exists(path) and not os.path.isdir(path):
        words, fix = "exists and is not a directory", "pass a directory path (or remove that file)"
    return f"{where}{words} ({errno.errorcode.get(exc.errno, exc.errno)}); {fix}"


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (``| head``): stop writing, say nothing, exit 128 + SIGPIPE.
    stdout is pointed at /dev/null so the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    return 141


_SIGINT_SEEN = False


def _on_sigint(signum, frame):
    global _SIGINT_SEEN
    _SIGINT_SEEN = True
    raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` when Ctrl-C came while ``run_guarded`` ran, even if that
    KeyboardInterrupt was swallowed where it landed (a weakref callback or ``__del__`` only
    prints "Exception ignored"): long loops call this at safe points (the harness: each case)."""
    if _SIGINT_SEEN:
        raise KeyboardInterrupt


def run_guarded(fn, args, interrupted: str = "error: interrupted") -> int:
    """``fn(args)`` for the engine and harness CLIs: an ``EngineError`` prints ``error: ...``
    (exit 2), as does an ``OSError`` in ``USER_ERRNOS`` (naming the path); a closed stdout
    exits 141 quietly; Ctrl-C prints the one line ``interrupted`` (exit 130), also when the
    interrupt was swallowed where it landed (``check_interrupt``); any other exception one line
    naming a saved traceback (exit 3)."""
    global _SIGINT_SEEN
    import signal
    import threading
    _SIGINT_SEEN = False
    installed = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if installed:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _guarded(fn, args, interrupted)
    finally:
        _SIGINT_SEEN = False          # in-process callers (tests) go on afterwards
        if installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _guarded(fn, args, interrupted: str) -> int:
    try:
        code = int(fn(args) or 0)
        sys.stdout.flush()       # a broken pipe surfaces here, not in the interpreter's exit
        if _SIGINT_SEEN:         # interrupted, and the KeyboardInterrupt was lost on the way
            print(interrupted, file=sys.stderr)
            return 130
        return code
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno in USER_ERRNOS:
            print(f"error: {describe_os_error(exc)}", file=sys.stderr)
            return 2
        return _internal(exc)
    except Exception as exc:  # noqa: BLE001
        return _internal(exc)


def _internal(exc: BaseException) -> int:
    """A bug: one line naming a traceback saved to a temp file (exit 3)."""
    with tempfile.NamedTemporaryFile("w", prefix="kvbench-traceback-", suffix=".txt", delete=False) as fh:
        traceback.print_exc(file=fh)
    first = str(exc).splitlines()[0] if str(exc) else ""
    print(f"error: internal error {type(exc).__name__}: {first} (traceback saved to {fh.name})",
          file=sys.stderr)
    return 3


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args._run, args)
