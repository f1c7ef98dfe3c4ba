"""Benchmark CLI: ``python -m bench.run`` (``make bench``).

Runs the selected parts in one invocation, so every baseline is measured beside the code it is
compared with: one process per GPU (spawned here) for the NCCL parts and the EPLB part, the
planner part in this process. Without a GPU (or with ``--cpu``), the EPLB part runs over gloo in
``--cpu-procs`` processes and the parts that need GPUs are reported as skipped.

Prints a table per part, and writes ``results.json``, ``summary.md`` and PNG plots to ``--out``.
Exit status: 0 when no part failed (skipped parts are not failures), 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import socket
import sys
import time
from typing import Any

from . import report
from .harness import (
    PartOutcome,
    PartSpec,
    custom_part,
    parse_bytes,
    run_children,
    run_parent_part,
)

# ---- the parts ------------------------------------------------------------------------------
# One ``part(...)`` call per part, in the order a default run takes them: name, "module:function"
# (``fn(ctx)`` on every rank for "child" parts, ``fn(args)`` in this process for "parent"
# ones), where, whether it needs GPUs, a one-line description. Its flags: a function taking
# the parser, appended to FLAGS below.
PARTS: dict[str, PartSpec] = {}
DEFAULT_PARTS: list[str] = []


def part(name, target, where, needs_gpu, description, *, default=True, hidden=False) -> None:
    PARTS[name] = PartSpec(name, target, where, needs_gpu, description, hidden)
    if default and not hidden:
        DEFAULT_PARTS.append(name)


part(
    "sendrecv",
    "bench.micro:run_sendrecv",
    "child",
    True,
    "ring send/recv bandwidth (nccl-tests semantics) per binding",
)
part(
    "alltoall",
    "bench.micro:run_alltoall",
    "child",
    True,
    "all-to-all through grouped p2p, bandwidth per binding",
)
part(
    "overhead",
    "bench.micro:run_overhead",
    "child",
    True,
    "host time per grouped p2p op (K sends + K recvs in one group)",
)
part(
    "eplb",
    "bench.eplb:run_eplb",
    "child",
    False,
    "EPLB expert-weight rearrangement (bench/eplb.py)",
)
part(
    "stress",
    "bench.stress:run_stress",
    "child",
    True,
    "async rearrangement beside a forward loop with its own NCCL traffic (bench/stress.py)",
)
part(
    "ipc",
    "bench.ipc_bench:run_ipc",
    "parent",
    True,
    "copy-engine transport: pull rate, host time per round, a rearrangement (bench/ipc_bench.py)",
)
part(
    "planner",
    "bench.planner_bench:run_planner",
    "parent",
    False,
    "EPLB planner timing, CPU only (bench/planner_bench.py)",
)
part(
    "placement",
    "bench.placement_bench:bench_placement",
    "parent",
    False,
    "EPLB placement policies over load sequences, CPU only (bench/placement_bench.py)",
)
part(
    "scale",
    "bench.scale:bench_scale",
    "parent",
    False,
    "time model: calibration against measured rows, EP8-256 / NVL72 rebalances (bench/scale.py)",
)
part(
    "selftest",
    "bench.micro:run_selftest",
    "child",
    False,
    "harness plumbing check (store, process group, timing); for debugging the bench",
    hidden=True,
)


def part_spec(name: str) -> PartSpec:
    """The spec of a registered part, or an ad hoc child part named ``module:function``."""
    if name in PARTS:
        return PARTS[name]
    if ":" in name:
        return custom_part(name)
    raise KeyError(
        f"unknown part {name!r}; known: {', '.join(p for p in PARTS if not PARTS[p].hidden)}"
    )


# ---- flags ----------------------------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default only where the help text does not already say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, "", False, argparse.SUPPRESS):
            return h
        return super()._get_help_string(action)


def _flags_what(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("what to run")
    g.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help="comma-separated parts, run in this order: "
        + ", ".join(f"{p} ({s.description})" for p, s in PARTS.items() if not s.hidden)
        + "; or module:function for an ad hoc per-rank part",
    )
    g.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="number of GPUs / ranks (default: all visible; 0 = CPU mode)",
    )
    g.add_argument("--cpu", action="store_true", help="CPU mode even if GPUs are visible")
    g.add_argument("--cpu-procs", type=int, default=2, help="ranks in CPU mode")
    g.add_argument(
        "--bindings",
        default="",
        help="only these bindings in the micro parts (comma list of "
        "eplb_pynccl, cupy, torch, nccl4py; default: all available)",
    )


def _flags_micro(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sendrecv / alltoall")
    g.add_argument(
        "--min-bytes", type=parse_bytes, default=8, help="smallest size (8, 4K, 1M, ...)"
    )
    g.add_argument("--max-bytes", type=parse_bytes, default=1 << 30, help="largest size")
    g.add_argument("--step-factor", type=int, default=4, help="size multiplier between steps")
    g.add_argument("--iters", type=int, default=20, help="timed iterations per repeat")
    g.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing")
    g.add_argument("--repeats", type=int, default=5, help="repeats (the median is reported)")
    g = ap.add_argument_group("overhead")
    g.add_argument(
        "--overhead-ops", type=int, default=256, help="K: sends (and as many recvs) per group"
    )
    g.add_argument("--overhead-bytes", type=parse_bytes, default=4096, help="bytes per op")
    g.add_argument(
        "--overhead-repeats", type=int, default=50, help="timed groups (the median is reported)"
    )


def _flags_eplb(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("eplb (passed to bench/eplb.py as ctx.args)")
    g.add_argument(
        "--eplb-cases",
        default="",
        help="comma-separated cases of bench/eplb.py CASES (default: dsv3, qwen3, dsv3-seq on "
        "GPUs; their -cpu versions in CPU mode)",
    )
    g.add_argument(
        "--eplb-layers-dsv3",
        type=int,
        default=None,
        help="layers of every DeepSeek-V3 case, CPU ones too (default: 4 on GPUs, 2 for -cpu cases)",
    )
    g.add_argument(
        "--eplb-layers-qwen",
        type=int,
        default=None,
        help="layers of every Qwen3 case, CPU ones too (default: 8 on GPUs, 2 for -cpu cases)",
    )
    g.add_argument("--eplb-repeats", type=int, default=5, help="timed repeats per EPLB method")
    g.add_argument(
        "--eplb-methods",
        default="",
        help="comma-separated methods of bench/eplb.py METHODS (default: every one the mode runs)",
    )
    g.add_argument(
        "--eplb-seq-steps",
        type=int,
        default=4,
        help="rebalances per policy in the dsv3-seq case (bench/eplb_sequence.py)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for placements and data")


def _flags_stress_ipc(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("stress (bench/stress.py)")
    g.add_argument(
        "--stress-variants",
        default="default,lockstep,step-after-read,lockstep-after-read,no-max-ctas,max-ctas-2,blocking,lazy-connect,small-forward,no-host-sync,ipc,ipc-after-read",
        help="comma-separated variants (bench/stress.py VARIANTS)",
    )
    g.add_argument("--stress-steps", type=int, default=500, help="forward steps per variant")
    g.add_argument(
        "--stress-timeout",
        type=float,
        default=60.0,
        help="communicator timeout (s) in the stress part: a hang fails the variant",
    )
    g = ap.add_argument_group("ipc (bench/ipc_bench.py)")
    g.add_argument(
        "--ipc-procs",
        type=int,
        default=4,
        help="processes of the copy-engine part, spread over the visible GPUs",
    )


def _flags_planner_placement(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("planner")
    g.add_argument("--planner-repeats", type=int, default=50, help="repeats of bench_planner")
    g = ap.add_argument_group("placement (bench/placement_bench.py)")
    g.add_argument(
        "--placement-steps",
        type=int,
        default=20,
        help="consecutive rebalances per shape, drift level and policy",
    )
    g.add_argument(
        "--placement-shapes",
        default="",
        help="comma-separated shapes (default: all of bench/placement_bench.py SHAPES)",
    )
    g.add_argument(
        "--placement-drifts",
        default="",
        help="comma-separated drift levels (default: all of bench/loadgen.py DRIFTS)",
    )


def _flags_output(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("output and robustness")
    g.add_argument(
        "--out", default="bench_out", help="directory for results.json, summary.md, PNGs"
    )
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds before all ranks are killed (the run then fails)",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits for its peers in a store exchange, and that the parent "
        "waits for progress after an error before killing the ranks",
    )
    g.add_argument("--master-port", type=int, default=0, help="TCPStore port (0: a free one)")
    g.add_argument(
        "--selfcheck",
        action="store_true",
        help="CPU self-check of statistics, tables, JSON, Markdown and plots, then exit",
    )
    g.add_argument("--list-parts", action="store_true", help="list the parts and exit")
    ap.add_argument(
        "--inject-fault", default="", help=argparse.SUPPRESS
    )  # RANK:PART:raise|hang|exit|skip


# in --help order; a part's flags: append its function (before _flags_output's group if you
# like the help that way)
FLAGS = [
    _flags_what,
    _flags_micro,
    _flags_eplb,
    _flags_stress_ipc,
    _flags_planner_placement,
    _flags_output,
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="eplb_pynccl benchmarks: NCCL p2p bindings compared, EPLB rearrangement, "
        "copy-engine transport, placement policies, planner. bench/README.md says more.",
        formatter_class=_Help,
    )
    for add in FLAGS:
        add(ap)
    return ap


def _version(mod: str, dist: str | None = None) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist or mod)
    except Exception:  # noqa: BLE001
        return None


def _module_version(mod: str) -> str | None:
    try:
        import importlib

        m = importlib.import_module(mod)
        v = getattr(m, "__version__", None)
        return f"{v} (source tree)" if v else "source tree"
    except Exception:  # noqa: BLE001
        return None


def base_meta(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": ["python", "-m", "bench.run"] + argv,
        "seed": args.seed,
        "torch": torch.__version__,
        "cupy": next(
            (
                v
                for v in (_version("cupy-cuda13x"), _version("cupy-cuda12x"), _version("cupy"))
                if v
            ),
            None,
        ),
        "nccl4py": _version("nccl4py"),
        "eplb_pynccl": _version("eplb-pynccl") or _module_version("eplb_pynccl"),
        "nccl_wheels": {
            d: v for d in ("nvidia-nccl-cu13", "nvidia-nccl-cu12") if (v := _version(d))
        },
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_", "CUDA_VISIBLE"))
        },
        "args": {k: v for k, v in vars(args).items() if k != "inject_fault"},
    }
    return meta


def visible_gpus() -> tuple[int, str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return 0, f"torch {torch.__version__} sees no CUDA device"
        return torch.cuda.device_count(), ""
    except Exception as e:  # noqa: BLE001
        return 0, f"{type(e).__name__}: {e}"


def print_part(o: PartOutcome) -> None:
    head = f"== {o.name}: {o.status}"
    if o.seconds:
        head += f" ({o.seconds:.1f} s)"
    if o.reason:
        head += f" -- {o.reason}"
    print("\n" + head, flush=True)
    if o.rows:
        for pname in dict.fromkeys(r.get("part", o.name) for r in o.rows):
            h, c = report.part_table(pname, [r for r in o.rows if r.get("part", o.name) == pname])
            if c:
                print(report.text_table(h, c))
        for e in report.error_lines(o.rows):
            print(f"   error: {e}")
        for line in report.highlights(o.rows):
            print(f"   {line}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list_parts:
        for p, s in PARTS.items():
            if not s.hidden:
                where = "per GPU rank" if s.where == "child" else "in the parent process"
                print(f"{p:10s} {s.description} [{where}{', needs GPUs' if s.needs_gpu else ''}]")
        return 0
    if args.selfcheck:
        out = os.path.join(args.out, "selfcheck") if args.out != ap.get_default("out") else None
        report.selfcheck(out)
        return 0
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        specs = [part_spec(p) for p in names]
    except KeyError as e:
        ap.error(str(e.args[0]))
    if len(set(names)) != len(names):
        ap.error("a part is listed twice")
    if args.min_bytes > args.max_bytes:
        ap.error("--min-bytes is larger than --max-bytes")
    if args.cpu_procs < 1:
        ap.error(f"--cpu-procs must be >= 1, got {args.cpu_procs}")
    for flag in ("eplb_layers_dsv3", "eplb_layers_qwen"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    from bench.eplb import CASES, METHODS

    for flag, known in (("eplb_cases", CASES), ("eplb_methods", METHODS)):
        bad = [x for x in getattr(args, flag).split(",") if x and x not in known]
        if bad:
            ap.error(
                f"--{flag.replace('_', '-')}: unknown {', '.join(map(repr, bad))}; known: {', '.join(known)}"
            )

    ngpu, why_no_gpu = visible_gpus()
    if args.cpu or args.gpus == 0:
        why_no_gpu = "--cpu" if args.cpu else "--gpus 0"
        ngpu = 0
    is_gpu = ngpu > 0
    if is_gpu:
        nprocs = ngpu if args.gpus is None else args.gpus
        if nprocs > ngpu:
            ap.error(f"--gpus {nprocs} but only {ngpu} visible")
    else:
        nprocs = args.cpu_procs
    meta = base_meta(args, argv)
    meta.update({"mode": "gpu" if is_gpu else "cpu", "world_size": nprocs})
    print(
        f"bench: {'GPU' if is_gpu else 'CPU'} mode, {nprocs} rank(s)"
        + ("" if is_gpu else f" ({why_no_gpu})")
        + f"; parts: {', '.join(names)}",
        flush=True,
    )

    outcomes: dict[str, PartOutcome] = {p: PartOutcome(p) for p in names}
    failures: list[str] = []
    t_start = time.perf_counter()
    child = []
    for s in specs:
        if s.where != "child" and not (s.needs_gpu and not is_gpu):
            continue
        if s.needs_gpu and not is_gpu:
            outcomes[s.name].status = "skipped"
            outcomes[s.name].reason = f"needs GPUs ({why_no_gpu})"
        else:
            child.append(s.name)
    for s in specs:
        if outcomes[s.name].status == "skipped":
            print_part(outcomes[s.name])
    if child:
        printed: set[str] = set()

        def on_done(o: PartOutcome) -> None:
            printed.add(o.name)
            print_part(o)

        res = run_children(
            [PARTS.get(c) or custom_part(c) for c in child], args, nprocs, is_gpu, on_done
        )
        meta.update(res.meta)
        failures += res.failures
        for name, o in res.outcomes.items():
            outcomes[name] = o
            if name not in printed:
                print_part(o)
    interrupted = False
    if child:
        interrupted = res.interrupted
    for s in specs:
        if s.where == "parent" and interrupted:
            outcomes[s.name].reason = "not run: interrupted"
        elif s.where == "parent" and outcomes[s.name].status != "skipped":
            print(f"\n-- running {s.name} in the parent process", flush=True)
            outcomes[s.name] = o = run_parent_part(s, args)
            if o.errors:
                print(next(iter(o.errors.values())), file=sys.stderr)
            print_part(o)

    rows = [r for p in names for r in outcomes[p].rows]
    parts_meta = {p: outcomes[p].as_meta() for p in names}
    meta["failures"] = failures
    meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    os.makedirs(args.out, exist_ok=True)
    for stale in report.OUTPUT_FILES:  # from an earlier run; this one may not write them all
        try:
            os.remove(os.path.join(args.out, stale))
        except FileNotFoundError:
            pass
    files = [report.write_json(os.path.join(args.out, "results.json"), meta, parts_meta, rows)]
    plots: list[str] = []
    if not args.no_plots:
        plots, why = report.make_plots(args.out, rows, meta)
        if why:
            print(f"plots skipped: {why}")
    files += plots
    files.append(
        report.write_markdown(os.path.join(args.out, "summary.md"), meta, parts_meta, rows, plots)
    )

    print("\n== summary")
    for p in names:
        o = outcomes[p]
        print(f"   {p:10s} {o.status:8s} {o.seconds:7.1f} s  {o.reason}")
    gpu_skips = [
        p for p in names if outcomes[p].status == "skipped" and "needs GPUs" in outcomes[p].reason
    ]
    if gpu_skips:
        print(f"   skipped because they need GPUs: {', '.join(gpu_skips)}")
    for line in report.highlights(rows):
        print(f"   {line}")
    for f in failures:
        print(f"   FAILURE: {f.splitlines()[0]}")
    print(f"   wrote {', '.join(files)}")
    bad = failures or any(outcomes[p].status in ("error", "not run", "running") for p in names)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
