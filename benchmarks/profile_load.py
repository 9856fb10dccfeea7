"""Where a model load's time goes (issue 14: coder30b-synth load <= 20 s; 21.9 s on the H200).

Loads ``--model`` (a registry name or a GGUF path) once with ``engine.load`` under cProfile,
prints the load's wall time, the file's size and effective read rate, and the functions with
the largest cumulative and own times; writes JSON (``--out``) with the same facts and the
.prof file beside it for snakeviz/pstats.

    python benchmarks/profile_load.py --model coder30b-synth --device cuda --out load.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def top(stats: pstats.Stats, key: str, n: int) -> list[dict]:
    """The n functions with the largest ``key`` ('cumulative' or 'tottime') time."""
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "own_s": round(tt, 3),
                     "cumulative_s": round(ct, 3)})
    rows.sort(key=lambda r: r["cumulative_s" if key == "cumulative" else "own_s"], reverse=True)
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="registry name (e.g. coder30b-synth) or GGUF path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weight-format", default="auto")
    ap.add_argument("--expert-format", default=None, choices=("weights", "blocks"),
                    help="routed experts at the weight format, or in the file's blocks (all on the device)")
    ap.add_argument("--cold", action="store_true",
                    help="ask the kernel to drop the file from the page cache first (posix_fadvise "
                         "DONTNEED; recorded, with the read rate that says whether it took)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="JSON file (and <out>.prof)")
    args = ap.parse_args(argv)
    import engine
    from engine import models
    from engine.errors import EngineError
    try:
        path = Path(models.resolve(args.model))
    except (EngineError, KeyError, ValueError) as exc:
        print(f"error: model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    size = path.stat().st_size
    dropped = None
    if args.cold:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped = True
        except OSError as exc:
            print(f"warning: could not drop {path.name} from the page cache: {exc}", file=sys.stderr)
            dropped = False
        finally:
            os.close(fd)
    kw = {} if args.expert_format is None else {"expert_format": args.expert_format,
                                                "cpu_moe": 0 if args.expert_format == "blocks" else None}
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    eng = engine.load(path, device=args.device, weight_format=args.weight_format, **kw)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof, stream=io.StringIO())
    doc = {"model": str(path), "file_bytes": size, "load_s": round(wall, 2), "read_gb_s": round(size / wall / 1e9, 2),
           "device": str(eng.device), "weight_format": eng.plan.weight_format,
           "expert_format": args.expert_format, "page_cache_dropped": dropped,
           "top_cumulative": top(stats, "cumulative", args.top), "top_own": top(stats, "tottime", args.top)}
    print(f"{path.name}: {size / 1e9:.1f} GB loaded in {wall:.1f} s ({doc['read_gb_s']} GB/s), "
          f"device {doc['device']}, weights {doc['weight_format']}, experts {args.expert_format or 'default'}"
          + (", page cache dropped first" if dropped else ""))
    print("largest own times:")
    for r in doc["top_own"]:
        print(f"  {r['own_s']:8.3f} s own {r['cumulative_s']:8.3f} s cum {r['calls']:>8} x  {r['function']}")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
        prof.dump_stats(os.fspath(args.out) + ".prof")
    return 0


if __name__ == "__main__":
    sys.exit(main())
