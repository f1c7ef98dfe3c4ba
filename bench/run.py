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
import math
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
    "placement-opt",
    "bench.placement_opt:bench_placement_opt",
    "parent",
    False,
    "placement vs the exact per-layer optimum (MILP, HiGHS), small shapes, CPU, ~5 min "
    "(bench/placement_opt.py)",
    default=False,
)
part(
    "scale",
    "bench.scale:bench_scale",
    "parent",
    False,
    "time model: calibration against measured rows, EP8-256 / NVL72 rebalances (bench/scale.py)",
)
part(
    "sglang",
    "bench.sglang:bench_sglang",
    "parent",
    False,
    "SGLang's EPLB update and policy vs eplb_pynccl's inside SGLang (bench/sglang.py)",
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


def _count(minimum: int):
    """argparse type: an integer >= ``minimum`` (the usage error names the flag)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return v

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return v


def _port(text: str) -> int:
    v = _count(0)(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [0, 65535], got {text!r}")
    return v


def _bytes(text: str) -> int:
    try:
        v = parse_bytes(text)
    except (ValueError, argparse.ArgumentTypeError):
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a size >= 1 byte (8, 4K, 1M, ...), got {text!r}")
    return v


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
        type=_count(0),
        default=None,
        help="number of GPUs / ranks (default: all visible; 0 = CPU mode)",
    )
    g.add_argument("--cpu", action="store_true", help="CPU mode even if GPUs are visible")
    g.add_argument("--cpu-procs", type=_count(1), default=2, help="ranks in CPU mode")
    g.add_argument(
        "--bindings",
        default="",
        help="only these bindings in the micro parts (comma list of "
        "eplb_pynccl, cupy, torch, nccl4py; default: all available)",
    )


def _add_flags(g: Any, flags: tuple) -> None:
    """Add the ``(flag, type, default, help)`` rows of ``flags`` to the group ``g``, in order
    (``type`` None: a string flag)."""
    for flag, kind, default, text in flags:
        g.add_argument(flag, type=kind, default=default, help=text)


def _flags_micro(ap: argparse.ArgumentParser) -> None:
    _add_flags(ap.add_argument_group("sendrecv / alltoall"), (
        ("--min-bytes", _bytes, 8, "smallest size (8, 4K, 1M, ...)"),
        ("--max-bytes", _bytes, 1 << 30, "largest size"),
        ("--step-factor", _count(2), 4, "size multiplier between steps"),
        ("--iters", _count(1), 20, "timed iterations per repeat"),
        ("--warmup", _count(0), 5, "untimed iterations before timing"),
        ("--repeats", _count(1), 5, "repeats (the median is reported)"),
    ))  # fmt: skip
    _add_flags(ap.add_argument_group("overhead"), (
        ("--overhead-ops", _count(1), 256, "K: sends (and as many recvs) per group"),
        ("--overhead-bytes", _bytes, 4096, "bytes per op"),
        ("--overhead-repeats", _count(1), 50, "timed groups (the median is reported)"),
    ))  # fmt: skip


def _flags_eplb(ap: argparse.ArgumentParser) -> None:
    layers = "layers of every {} case, CPU ones too (default: {} on GPUs, 2 for -cpu cases)"
    _add_flags(ap.add_argument_group("eplb (passed to bench/eplb.py as ctx.args)"), (
        ("--eplb-cases", None, "", "comma-separated cases of bench/eplb.py CASES (default: "
            "dsv3, qwen3, dsv3-seq on GPUs; their -cpu versions in CPU mode)"),
        ("--eplb-layers-dsv3", _count(1), None, layers.format("DeepSeek-V3", 4)),
        ("--eplb-layers-qwen", _count(1), None, layers.format("Qwen3", 8)),
        ("--eplb-repeats", _count(1), 5, "timed repeats per EPLB method"),
        ("--eplb-methods", None, "", "comma-separated methods of bench/eplb.py METHODS "
            "(default: every one the mode runs)"),
        ("--eplb-seq-steps", _count(1), 4, "rebalances per policy in the dsv3-seq case "
            "(bench/eplb_sequence.py)"),
        ("--seed", int, 0, "seed for placements and data"),
    ))  # fmt: skip


STRESS_VARIANTS = (
    "default,lockstep,step-after-read,lockstep-after-read,no-max-ctas,max-ctas-2,blocking,"
    "lazy-connect,small-forward,no-host-sync,ipc,ipc-after-read"
)


def _flags_stress_ipc(ap: argparse.ArgumentParser) -> None:
    _add_flags(ap.add_argument_group("stress (bench/stress.py)"), (
        ("--stress-variants", None, STRESS_VARIANTS, "comma-separated variants (bench/stress.py VARIANTS)"),
        ("--stress-steps", _count(1), 500, "forward steps per variant"),
        ("--stress-timeout", _seconds, 60.0, "communicator timeout (s) in the stress part: "
            "a hang fails the variant"),
    ))  # fmt: skip
    _add_flags(ap.add_argument_group("ipc (bench/ipc_bench.py)"), (
        ("--ipc-procs", _count(2), 4, "processes of the copy-engine part, spread over the "
            "visible GPUs"),
    ))  # fmt: skip


def _flags_planner_placement(ap: argparse.ArgumentParser) -> None:
    _add_flags(ap.add_argument_group("planner"), (
        ("--planner-repeats", _count(1), 50, "repeats of bench_planner"),
    ))  # fmt: skip
    _add_flags(ap.add_argument_group("placement (bench/placement_bench.py)"), (
        ("--placement-steps", _count(1), 20, "consecutive rebalances per shape, drift level "
            "and policy"),
        ("--placement-shapes", None, "", "comma-separated shapes (default: all of "
            "bench/placement_bench.py SHAPES)"),
        ("--placement-drifts", None, "", "comma-separated drift levels (default: all of "
            "bench/loadgen.py DRIFTS)"),
    ))  # fmt: skip


def _flags_output(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("output and robustness")
    g.add_argument(
        "--out", default="bench_out", help="directory for results.json, summary.md, PNGs"
    )
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=1800.0,
        help="seconds before all ranks are killed (the run then fails)",
    )
    g.add_argument(
        "--stall-timeout",
        type=_seconds,
        default=300.0,
        help="seconds a rank waits for its peers in a store exchange, and that the parent "
        "waits for progress after an error before killing the ranks",
    )
    g.add_argument("--master-port", type=_port, default=0, help="TCPStore port (0: a free one)")
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


def print_part(o: PartOutcome, cpu: bool = False) -> None:
    head = f"== {o.name}: {o.status}"
    if o.seconds:
        head += f" ({o.seconds:.1f} s)"
    if o.reason:
        head += f" -- {o.reason}"
    print("\n" + head, flush=True)
    for line in report.part_text(o.name, o.rows, cpu):
        print(line)
    sys.stdout.flush()


# ---- checks before anything runs ------------------------------------------------------------


def _comma_flags() -> list[tuple[str, Any]]:
    """(flag, known values) of the comma-list flags (their modules are imported for it)."""
    from bench.eplb import CASES, METHODS
    from bench.loadgen import DRIFTS
    from bench.micro import BW_BINDINGS, OVERHEAD_BINDINGS
    from bench.stress import VARIANTS

    try:
        from bench.placement_bench import SHAPES
    except ModuleNotFoundError:  # the placement extra (scipy) is not installed: no check
        SHAPES = None
    bindings = list(dict.fromkeys([*BW_BINDINGS, *OVERHEAD_BINDINGS]))
    return [
        ("eplb_cases", CASES),
        ("eplb_methods", METHODS),
        ("placement_shapes", SHAPES),
        ("placement_drifts", DRIFTS),
        ("stress_variants", VARIANTS),
        ("bindings", bindings),
    ]


def _check_lists(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from bench.common import listed

    for flag, known in _comma_flags():
        if known is None:
            continue
        bad = [x for x in listed(args, flag) if x not in known]
        if bad:
            ap.error(
                f"--{flag.replace('_', '-')}: unknown {', '.join(map(repr, bad))}; "
                f"known: {', '.join(known)}"
            )
    if args.min_bytes > args.max_bytes:
        ap.error("--min-bytes is larger than --max-bytes")


def _selected_parts(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[PartSpec]:
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not names:
        ap.error(f"--parts {args.parts!r} names no part; known: {', '.join(DEFAULT_PARTS)}")
    if len(set(names)) != len(names):
        ap.error("--parts: a part is listed twice")
    try:
        return [part_spec(p) for p in names]
    except KeyError as e:
        ap.error(f"--parts: {e.args[0]}")


def _mode(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[bool, int, str]:
    """(GPU mode, ranks, why not GPU mode)."""
    ngpu, why_no_gpu = visible_gpus()
    if args.cpu or args.gpus == 0:
        return False, args.cpu_procs, "--cpu" if args.cpu else "--gpus 0"
    if ngpu == 0:
        return False, args.cpu_procs, why_no_gpu
    nprocs = ngpu if args.gpus is None else args.gpus
    if nprocs > ngpu:
        ap.error(f"--gpus {nprocs} but only {ngpu} visible")
    return True, nprocs, ""


def _host_memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_fit(ap, args, specs: list[PartSpec], is_gpu: bool, nprocs: int) -> None:
    """CPU mode: every eplb case's ranks share this host's memory; refuse a case that cannot
    fit (before any rank starts), saying what it needs."""
    if is_gpu or "eplb" not in [s.name for s in specs]:
        return
    avail = _host_memory_available()
    if avail is None:
        return
    from types import SimpleNamespace

    from bench.eplb import case_memory, wanted_cases

    GiB = 1 << 30
    bad = []
    for case in wanted_cases(SimpleNamespace(args=args, is_gpu=False)):
        per_rank, how = case_memory(case, nprocs, args)
        if per_rank * nprocs > 0.8 * avail:
            bad.append(
                f"{case} needs about {per_rank * nprocs / GiB:.1f} GiB of host memory in CPU "
                f"mode ({nprocs} ranks x {how}); {avail / GiB:.1f} GiB is available"
            )
    if bad:
        ap.error(
            "--eplb-cases: " + "; ".join(bad) + " (the -cpu cases are the same layouts shrunk "
            "for gloo; fewer layers: --eplb-layers-dsv3 / --eplb-layers-qwen)"
        )


def _check_out(ap: argparse.ArgumentParser, out: str) -> None:
    """--out must be a directory this process can write, found before any part runs."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".bench-write-check-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        ap.error(f"--out {out!r} is not a directory this process can write: {e.strerror or e}")


# ---- the run --------------------------------------------------------------------------------


def _run_parts(specs, args, nprocs: int, is_gpu: bool, why_no_gpu: str, meta: dict):
    """Run every part (children first, then the parent's). (outcomes, failures)."""
    outcomes = {s.name: PartOutcome(s.name) for s in specs}
    failures: list[str] = []
    cpu = not is_gpu
    child = []
    for s in specs:
        if s.needs_gpu and not is_gpu:
            outcomes[s.name].status = "skipped"
            outcomes[s.name].reason = f"needs GPUs ({why_no_gpu})"
            print_part(outcomes[s.name])
        elif s.where == "child":
            child.append(s)
    interrupted = False
    if child:
        printed: set[str] = set()

        def on_done(o: PartOutcome) -> None:
            printed.add(o.name)
            print_part(o, cpu)

        res = run_children(child, args, nprocs, is_gpu, on_done)
        meta.update(res.meta)
        failures += res.failures
        interrupted = res.interrupted
        for name, o in res.outcomes.items():
            outcomes[name] = o
            if name not in printed:
                print_part(o, cpu)
    for s in specs:
        if s.where != "parent" or outcomes[s.name].status == "skipped":
            continue
        if interrupted:
            outcomes[s.name].reason = "not run: interrupted"
            continue
        print(f"\n-- running {s.name} in the parent process", flush=True)
        outcomes[s.name] = o = run_parent_part(s, args)
        if o.errors:
            print(next(iter(o.errors.values())), file=sys.stderr)
        print_part(o, cpu)
    return outcomes, failures


def _write_outputs(args, meta: dict, outcomes: dict, names: list[str]) -> list[str]:
    rows = [r for p in names for r in outcomes[p].rows]
    parts_meta = {p: outcomes[p].as_meta() for p in names}
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
    return files


def _print_summary(outcomes: dict, names: list[str], failures: list[str], files, cpu) -> int:
    """The summary lines; the exit status (1 when a part failed or the run did)."""
    rows = [r for p in names for r in outcomes[p].rows]
    print("\n== summary")
    for p in names:
        o = outcomes[p]
        print(f"   {p:10s} {o.status:8s} {o.seconds:7.1f} s  {o.reason}")
    gpu_skips = [
        p for p in names if outcomes[p].status == "skipped" and "needs GPUs" in outcomes[p].reason
    ]
    if gpu_skips:
        print(f"   skipped because they need GPUs: {', '.join(gpu_skips)}")
    for line in report.highlights(rows, cpu):
        print(f"   {line}")
    for f in failures:
        print(f"   FAILURE: {f.splitlines()[0]}")
    print(f"   wrote {', '.join(files)}")
    bad = failures or any(outcomes[p].status in ("error", "not run", "running") for p in names)
    return 1 if bad else 0


def _list_parts() -> int:
    for p, s in PARTS.items():
        if not s.hidden:
            where = "per GPU rank" if s.where == "child" else "in the parent process"
            print(f"{p:10s} {s.description} [{where}{', needs GPUs' if s.needs_gpu else ''}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list_parts:
        return _list_parts()
    if args.selfcheck:
        out = os.path.join(args.out, "selfcheck") if args.out != ap.get_default("out") else None
        report.selfcheck(out)
        return 0
    specs = _selected_parts(ap, args)
    names = [s.name for s in specs]
    _check_lists(ap, args)
    is_gpu, nprocs, why_no_gpu = _mode(ap, args)
    _check_fit(ap, args, specs, is_gpu, nprocs)
    _check_out(ap, args.out)
    meta = base_meta(args, argv)
    meta.update({"mode": "gpu" if is_gpu else "cpu", "world_size": nprocs})
    print(
        f"bench: {'GPU' if is_gpu else 'CPU'} mode, {nprocs} rank(s)"
        + ("" if is_gpu else f" ({why_no_gpu})")
        + f"; parts: {', '.join(names)}",
        flush=True,
    )
    t_start = time.perf_counter()
    outcomes, failures = _run_parts(specs, args, nprocs, is_gpu, why_no_gpu, meta)
    meta["failures"] = failures
    meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    files = _write_outputs(args, meta, outcomes, names)
    return _print_summary(outcomes, names, failures, files, not is_gpu)


if __name__ == "__main__":
    sys.exit(main())
