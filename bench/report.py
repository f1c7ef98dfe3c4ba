"""Row schema, tables (text and Markdown), JSON, plots, and a CPU self-check of all of it.

Row schema
==========
Every row is a flat dict (JSON scalars only) with a ``'part'`` key. Units are in the key names:
``_bytes``, ``_us`` (microseconds), ``_ms``, ``_gbps`` (GB/s, 1 GB = 1e9 bytes). Keys a row does
not have are shown as blanks. A row with an ``'error'`` key says a binding/method failed; it has
no measurements.

sendrecv, alltoall (bench/micro.py), one row per (binding, size)::

    part, binding, world_size, size_bytes,
    time_us        median over repeats of the per-iteration time, slowest rank
    time_us_min    fastest repeat (any rank)     time_us_max  slowest repeat (any rank)
    algbw_gbps     size_bytes / time             busbw_gbps   algbw (sendrecv); algbw*(n-1)/n (alltoall)
    check          'ok' | 'FAIL' (received bytes compared with the pattern the peer sent)
    iters, repeats, note

    sendrecv: rank r sends size_bytes to r+1 and receives from r-1.
    alltoall: size_bytes is the total a rank sends; size_bytes/n to each rank, itself included.

overhead (bench/micro.py), one row per binding::

    part, binding, world_size, ops_per_rank (2K: K sends + K recvs), op_bytes,
    host_us_per_op       (group exit returned - group start) / 2K; median over repeats; slowest rank
    host_us_per_op_p90   90th percentile of the same, slowest rank
    e2e_us_per_op        (stream synchronised - group start) / 2K; median; fastest rank
    host_ratio_vs_cupy   host_us_per_op / cupy's (target for eplb_pynccl: <= 2)
    check, repeats

eplb (bench/eplb.py, the lead's ``run_eplb(ctx)``), one row per (case, method)::

    part='eplb'
    case           str, the workload, e.g. 'dsv3-fp8 ep4 4L'            (required)
    method         str, e.g. 'vllm-style', 'naive-pack', 'eplb_pynccl', 'link-floor'   (required)
    time_ms        float, median time of the whole rearrangement          (required)
    gbps_per_gpu   float, max bytes moved by any GPU / time_ms            (required)
    optional: world_size, layers, bytes_max_per_gpu, time_ms_min, time_ms_max, repeats,
              check ('ok'|'FAIL'), speedup (vs a baseline named in note), note,
              reference (bool: a computed bound, not a measurement; 'floor' in the method
              name implies it) -- drawn hatched in the plot.

planner (bench/planner_bench.py, runs in the parent): free-form numeric columns, shown as given.

placement (bench/placement_bench.py, runs in the parent), one row per (shape, drift, policy)::

    shape, drift, policy, rebalances
    imb_mean, imb_max      max GPU load / mean GPU load, mean and max over layers and rebalances
    excess_pct(_max)       the same as % above perfect balance: 100 * (imb - 1) (in the table)
    changed_pct            slots changed, % of all slots, mean per rebalance
    recv_max_gib(_peak)    bytes received by the busiest GPU per rebalance, mean (max) over them
    internode_gib          bytes crossing nodes per rebalance (all GPUs), mean
    ms_median, ms_max      policy time per rebalance
    bytes_vs_deepseek      recv_max_gib / deepseek's; migration_aware also target_missed,
                           over_ref (rebalances with more bytes than the relabelled reference
                           from the same placement); regime drift also shift_recv_max_gib
    placement-targets rows: shape, drift, target, measured, status ('met' or 'MISSED: why')

Output files (``--out``): ``results.json`` ({"meta", "parts", "rows"}), ``summary.md``, and
``sendrecv_busbw.png``, ``alltoall_busbw.png``, ``overhead_host.png``, ``eplb.png`` when the part has
rows and matplotlib is importable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

BW_PARTS = ("sendrecv", "alltoall")
EPLB_REQUIRED = ("case", "method", "time_ms", "gbps_per_gpu")
OVERHEAD_TARGET_RATIO = 2.0
OUTPUT_FILES = (
    "results.json",
    "summary.md",
    "sendrecv_busbw.png",
    "alltoall_busbw.png",
    "overhead_host.png",
    "eplb.png",
    "placement.png",
)
# the eplb table on stdout and in summary.md; results.json has every column
EPLB_COLUMNS = (
    "case",
    "method",
    "time_ms",
    "model_ms",
    "model_err",
    "gbps_per_gpu",
    "speedup",
    "check",
    "changed_frac",
    "messages_max",
    "rounds",
    "peak_extra_mib",
    "imbalance",
    "policy_ms",
)
CPU_NOTE = (
    "CPU mode: gloo processes sharing this host's cores; these times and speedups say "
    "nothing of GPUs (bench/RESULTS.md has GPU runs)"
)
PLACEMENT_COLUMNS = (
    "shape",
    "drift",
    "policy",
    "excess_pct",
    "excess_pct_max",
    "changed_pct",
    "recv_max_gib",
    "recv_max_gib_peak",
    "internode_gib",
    "ms_median",
    "ms_max",
    "bytes_vs_deepseek",
)


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def fmt_bytes(n: int | float) -> str:
    """Exact: the largest binary unit that divides n, else bytes ('4 KiB', '1.5 MiB', '4,092 B')."""
    n = int(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and (n * 4) % size == 0:  # whole or quarter units
            return f"{n / size:g} {unit}"
    return f"{n:,} B"


def fmt_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"  # no thousands separators: ints are shown without them too
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.3g}"
    return str(v)


def text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def md_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    def numeric(i: int) -> bool:
        """Right-align a column whose cells are all numbers (a trailing ' FAIL' allowed)."""
        vals = [r[i].replace(",", "").split(" ")[0] for r in cells if i < len(r) and r[i]]
        try:
            [float(v) for v in vals]
        except ValueError:
            return False
        return bool(vals)

    out = [
        "| " + " | ".join(esc(h) for h in headers) + " |",
        "|" + "|".join("---:" if i and numeric(i) else "---" for i in range(len(headers))) + "|",
    ]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in cells]
    return "\n".join(out)


def _ordered_keys(
    rows: Iterable[dict], first: Sequence[str] = (), skip: Sequence[str] = ("part",)
) -> list[str]:
    keys: list[str] = [k for k in first]
    for r in rows:
        for k in r:
            if k not in keys and k not in skip:
                keys.append(k)
    return [k for k in keys if any(k in r for r in rows)] if rows else list(first)


# --------------------------------------------------------------------------------------------
# Per-part tables
# --------------------------------------------------------------------------------------------


def _bindings(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        b = r.get("binding")
        if b is not None and b not in seen and "error" not in r:
            seen.append(b)
    return seen


def _rows_with(rows: list[dict], part: str, *keys: str) -> list[dict]:
    """The rows of ``part`` that have every one of ``keys``."""
    return [r for r in rows if r.get("part") == part and all(k in r for k in keys)]


def part_table(part: str, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the readable table of one part."""
    rows = [r for r in rows if r.get("part", part) == part]
    good = [r for r in rows if "error" not in r]
    if part in BW_PARTS and good and "size_bytes" in good[0]:
        bs = _bindings(good)
        headers = ["size"] + [h for b in bs for h in (f"{b} us", f"{b} busbw")]
        by = {(r["binding"], r["size_bytes"]): r for r in good}
        cells = []
        for size in sorted({r["size_bytes"] for r in good}):
            row = [fmt_bytes(size)]
            for b in bs:
                r = by.get((b, size))
                if r is None:
                    row += ["", ""]
                else:
                    flag = "" if r.get("check", "ok") == "ok" else " FAIL"
                    row += [fmt_cell(float(r["time_us"])), fmt_cell(float(r["busbw_gbps"])) + flag]
            cells.append(row)
        return headers, cells
    if part == "overhead":
        cols = [
            "binding",
            "host_us_per_op",
            "host_us_per_op_p90",
            "e2e_us_per_op",
            "host_ratio_vs_cupy",
            "check",
            "ops_per_rank",
            "op_bytes",
        ]
    elif part == "eplb":
        good = [r for r in good if "skipped" not in r]
        cols = list(EPLB_COLUMNS)
    elif part == "placement":
        cols = list(PLACEMENT_COLUMNS)
    else:
        cols = _ordered_keys(good)
    cols = [c for c in cols if any(c in r for r in good)] or ["binding"]
    cells = [[fmt_cell(r.get(c)) for c in cols] for r in good]
    return cols, cells


def part_text(part: str, rows: list[dict], cpu: bool = False) -> list[str]:
    """What stdout shows of a part: its tables, then notes, skipped cases and errors."""
    out = []
    for pname in dict.fromkeys(r.get("part", part) for r in rows):
        mine = [r for r in rows if r.get("part", part) == pname]
        h, c = part_table(pname, mine)
        if c:
            out.append(text_table(h, c))
        out += [f"   note: {n}" for n in note_lines(pname, mine, cpu)]
    out += [f"   skipped: {r['case']}: {r['skipped']}" for r in rows if "skipped" in r]
    out += [f"   error: {e}" for e in error_lines(rows)]
    return out


def note_lines(part: str, rows: list[dict], cpu: bool = False) -> list[str]:
    """The eplb rows' notes, each once (the table leaves the column out), and the CPU note."""
    if part != "eplb":
        return []
    notes = list(dict.fromkeys(r["note"] for r in rows if r.get("note")))
    notes += list(
        dict.fromkeys(f"model n/a: {r['model_note']}" for r in rows if r.get("model_note"))
    )
    if cpu and any("time_ms" in r for r in rows):
        notes.append(CPU_NOTE)
    return notes


def error_lines(rows: list[dict]) -> list[str]:
    return [
        f"{r.get('binding') or r.get('method') or '?'}: {r['error']}" for r in rows if "error" in r
    ]


def highlights(rows: list[dict], cpu: bool = False) -> list[str]:
    """One-line conclusions: overhead ratios vs cupy, best busbw per binding, eplb vs floor,
    how many placement targets were met (their table has the lines)."""
    out = []
    ov = _rows_with(rows, "overhead", "host_us_per_op")
    cupy = next((r for r in ov if r["binding"] == "cupy"), None)
    for r in ov:
        if r["binding"].startswith("eplb_pynccl"):
            if cupy:
                ratio = r["host_us_per_op"] / cupy["host_us_per_op"]
                verdict = "meets" if ratio <= OVERHEAD_TARGET_RATIO else "MISSES"
                out.append(
                    f"overhead: {r['binding']} host {r['host_us_per_op']:.2f} us/op = "
                    f"{ratio:.2f}x cupy ({cupy['host_us_per_op']:.2f} us/op); "
                    f"{verdict} the <= {OVERHEAD_TARGET_RATIO:g}x target"
                )
            else:
                out.append(
                    f"overhead: {r['binding']} host {r['host_us_per_op']:.2f} us/op (no cupy row to compare)"
                )
    for part in BW_PARTS:
        good = _rows_with(rows, part, "busbw_gbps")
        if not good:
            continue
        top = max(r["size_bytes"] for r in good)
        at_top = {r["binding"]: r for r in good if r["size_bytes"] == top}
        desc = ", ".join(f"{b} {r['busbw_gbps']:.1f}" for b, r in at_top.items())
        out.append(f"{part} busbw at {fmt_bytes(top)} (GB/s): {desc}")
        fails = sorted({r["binding"] for r in good if r.get("check") not in (None, "ok")})
        if fails:
            out.append(f"{part}: DATA CHECK FAILED for {', '.join(fails)}")
    tg = _rows_with(rows, "placement-targets")
    if tg:
        missed = [r for r in tg if r["status"] != "met"]
        out.append(
            f"placement targets: {len(tg) - len(missed)} met, {len(missed)} MISSED (the "
            "placement-targets table; a MISSED target is a finding, not a failure: "
            "bench/README.md)"
        )
    ep = _rows_with(rows, "eplb", "time_ms", "case")
    if ep and cpu:
        out.append(f"eplb: {CPU_NOTE}")
    for case in dict.fromkeys(r["case"] for r in ep):
        rs = [r for r in ep if r["case"] == case]
        desc = ", ".join(f"{r.get('method')} {float(r['time_ms']):.1f} ms" for r in rs)
        out.append(f"eplb {case}: {desc}")
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    item = getattr(o, "item", None)
    if callable(item):
        return item()
    return str(o)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def write_json(path: str, meta: dict, parts: dict, rows: list[dict]) -> str:
    with open(path, "w") as f:
        json.dump(
            _nan_to_none({"meta": meta, "parts": parts, "rows": rows}),
            f,
            indent=1,
            default=_json_default,
        )
        f.write("\n")
    return path


_META_KEYS = (
    "date",
    "hostname",
    "mode",
    "world_size",
    "gpu_names",
    "nccl_versions",
    "torch",
    "cupy",
    "nccl4py",
    "eplb_pynccl",
    "python",
    "seed",
    "argv",
)


def _meta_lines(meta: dict) -> list[str]:
    """The run's description: a ``- **key**: value`` line per known meta key, then the bindings."""
    out = []
    for k in _META_KEYS:
        if k in meta:
            v = meta[k]
            if isinstance(v, list) and k == "gpu_names":
                v = ", ".join(dict.fromkeys(v)) + f" (x{len(v)})"
            elif isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items())
            elif isinstance(v, list):
                v = " ".join(map(str, v))
            out.append(f"- **{k}**: {v}")
    if meta.get("bindings"):
        out.append("- **bindings**: " + "; ".join(f"{k}: {v}" for k, v in meta["bindings"].items()))
    return out


def _part_sections(parts: dict, rows: list[dict], cpu: bool) -> list[str]:
    """A ``## part`` section per part with rows (parts first, then parts only rows name): its
    table, then its notes, skipped cases and errors."""
    out: list[str] = []
    for p in dict.fromkeys([*parts, *(r.get("part") for r in rows)]):
        prow = _rows_with(rows, p)
        if not prow:
            continue
        h, c = part_table(p, prow)
        out += ["", f"## {p}", ""]
        if c:
            out.append(md_table(h, c))
        notes = [f"- note: {n}" for n in note_lines(p, prow, cpu)]
        notes += [f"- skipped: {r['case']}: {r['skipped']}" for r in prow if "skipped" in r]
        notes += [f"- error: {e}" for e in error_lines(prow)]
        if notes:
            out += [""] + notes
    return out


def markdown_summary(meta: dict, parts: dict, rows: list[dict], plots: Sequence[str] = ()) -> str:
    cpu = meta.get("mode") == "cpu"
    out = ["# eplb_pynccl benchmark", ""] + _meta_lines(meta)
    out += [
        "",
        "## Parts",
        "",
        md_table(
            ["part", "status", "seconds", "reason"],
            [
                [p, d.get("status", ""), fmt_cell(d.get("seconds")), d.get("reason", "")]
                for p, d in parts.items()
            ],
        ),
    ]
    hl = highlights(rows, cpu)
    if hl:
        out += ["", "## Highlights", ""] + [f"- {h}" for h in hl]
    out += _part_sections(parts, rows, cpu)
    if plots:
        out += ["", "## Plots", ""] + [
            f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots
        ]
    return "\n".join(out) + "\n"


def write_markdown(
    path: str, meta: dict, parts: dict, rows: list[dict], plots: Sequence[str] = ()
) -> str:
    with open(path, "w") as f:
        f.write(markdown_summary(meta, parts, rows, plots))
    return path


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str, dpi: int) -> str:
    """Write ``fig`` to ``path`` and free it; returns ``path``."""
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _title_suffix(meta: dict) -> str:
    g = meta.get("gpu_names") or []
    n = meta.get("world_size")
    name = g[0] if g else meta.get("mode", "")
    return f" ({n}x {name})" if n else ""


def plot_bandwidth(path: str, part: str, rows: list[dict], meta: dict) -> str | None:
    good = _rows_with(rows, part, "busbw_gbps")
    if not good:
        return None
    plt = _plt()
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(13, 5))
    ticks = sorted({r["size_bytes"] for r in good})
    for b in _bindings(good):
        pts = sorted(
            (r["size_bytes"], r["busbw_gbps"], r["time_us"]) for r in good if r["binding"] == b
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=b)
        ax_t.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=b)
    for a in (ax, ax_t):
        a.set_xscale("log", base=2)
        a.set_xticks(ticks)
        a.set_xticklabels(
            [fmt_bytes(t).replace(" ", "") for t in ticks], rotation=45, ha="right", fontsize=7
        )
        a.set_xlabel("size per rank")
        a.grid(True, alpha=0.3)
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title("bus bandwidth")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time (µs)")
    ax_t.set_title("time per operation")
    ax.legend()
    fig.suptitle(f"{part}{_title_suffix(meta)}")
    fig.tight_layout()
    return _save(fig, path, 110)


def plot_overhead(path: str, rows: list[dict], meta: dict) -> str | None:
    good = _rows_with(rows, "overhead", "host_us_per_op")
    if not good:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["binding"] for r in good]
    x = list(range(len(good)))
    ax.bar([i - 0.2 for i in x], [r["host_us_per_op"] for r in good], 0.4, label="host (enqueue)")
    ax.bar([i + 0.2 for i in x], [r.get("e2e_us_per_op", 0) for r in good], 0.4, label="end to end")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("µs per op")
    k = good[0].get("ops_per_rank", "?")
    ax.set_title(f"overhead: {k} grouped p2p ops per rank{_title_suffix(meta)}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path, 120)


def _is_reference(r: dict) -> bool:
    return bool(r.get("reference")) or "floor" in str(r.get("method", "")).lower()


def plot_eplb(path: str, rows: list[dict], meta: dict) -> str | None:
    fig = eplb_figure(rows, meta)
    if fig is None:
        return None
    return _save(fig, path, 120)


def eplb_figure(rows: list[dict], meta: dict):
    """The EPLB plot (time and GB/s per case and method) as a matplotlib figure, or None."""
    good = _rows_with(rows, "eplb", "case", "method", "time_ms")
    if not good:
        return None
    plt = _plt()
    cases = list(dict.fromkeys(r["case"] for r in good))
    methods = list(dict.fromkeys(r["method"] for r in good))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3 + 2.2 * len(cases)), 4.8))
    width = 0.8 / max(1, len(methods))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in (
        (axes[0], "time_ms", "time (ms), lower is better"),
        (axes[1], "gbps_per_gpu", "GB/s per GPU, higher is better"),
    ):
        for j, m in enumerate(methods):
            xs, ys, refs = [], [], []
            for i, c in enumerate(cases):
                r = next(
                    (r for r in good if r["case"] == c and r["method"] == m and key in r), None
                )
                if r is not None and r[key] is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(float(r[key]))
                    refs.append(_is_reference(r))
            bars = ax.bar(xs, ys, width, label=m, color=colors[j % len(colors)])
            for b, ref in zip(bars, refs, strict=True):
                if ref:
                    b.set_hatch("//")
                    b.set_alpha(0.55)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)  # bars from zero, also when every value is tiny
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    # as many columns as fit the figure's width (8-pt text: ~5.5 pt per character plus the
    # marker), and room below the axes for every legend row
    width_pt = fig.get_figwidth() * 72
    per_col = 5.5 * max(len(x) for x in labels) + 40
    ncol = max(1, min(len(labels), int(width_pt // per_col)))
    nrows = -(-len(labels) // ncol)
    legend_h = (0.3 + 0.2 * nrows) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"EPLB rearrangement{_title_suffix(meta)}")
    fig.tight_layout(rect=(0, legend_h, 1, 1))
    return fig


_PLACEMENT_MARKERS = "osD^vP*X"


def _placement_panel(ax, fig, mine: list[dict], style) -> None:
    """One shape's panel: a point per (drift, policy); points above the y range sit on the
    top edge, side by side, each with its value. ``style(row)`` gives a point's color and
    marker."""
    import matplotlib.transforms as mtransforms

    moving = [r["imb_mean"] for r in mine if r["recv_max_gib"] > 0] or [r["imb_mean"] for r in mine]
    lo, hi = min(moving), max(moving)
    top = hi + max(0.02, 0.15 * (hi - lo))
    off = 0  # off-scale points on the top edge, side by side, each with its value
    for r in mine:
        kw = dict(s=36, **style(r))
        if r["imb_mean"] <= top:
            ax.scatter(r["recv_max_gib"], r["imb_mean"], **kw)
            continue
        dx = 10 + 18 * off  # points right of the point's own x
        shift = mtransforms.offset_copy(ax.transData, fig=fig, x=dx, units="points")
        ax.scatter(r["recv_max_gib"], top, transform=shift, clip_on=False, **kw)
        ax.annotate(
            f"{r['imb_mean']:.2f}",
            (r["recv_max_gib"], top),
            fontsize=6,
            ha="center",
            xytext=(dx, -11),
            textcoords="offset points",
        )
        off += 1
    ax.set_ylim(min(1.0, lo) - 0.005, top + 0.01)
    ax.set_xlim(0, max(r["recv_max_gib"] for r in mine) * 2 + 0.02)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_title(mine[0]["shape"], fontsize=9)
    ax.set_xlabel("GiB received by the busiest GPU per rebalance", fontsize=8)
    ax.set_ylabel("imbalance (max / mean GPU load)", fontsize=8)
    ax.grid(True, alpha=0.3)


def _placement_legend(plt, policies: list, drifts: list, colors: list) -> list:
    """Legend handles: a gray marker per policy, then a colored dot per drift."""
    markers = _PLACEMENT_MARKERS
    handles = [
        plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], ls="", label=p)
        for i, p in enumerate(policies)
    ]
    handles += [
        plt.Line2D([], [], color=colors[i % len(colors)], marker="o", ls="", label=d)
        for i, d in enumerate(drifts)
    ]
    return handles


def plot_placement(path: str, rows: list[dict], meta: dict) -> str | None:
    """Bytes moved vs imbalance per shape: one point per (drift, policy)."""
    good = _rows_with(rows, "placement", "imb_mean")
    if not good:
        return None
    plt = _plt()

    shapes = list(dict.fromkeys(r["shape"] for r in good))
    drifts = list(dict.fromkeys(r["drift"] for r in good))
    policies = list(dict.fromkeys(r["policy"] for r in good))
    cols = min(3, len(shapes))
    nrow = -(-len(shapes) // cols)
    fig, axes = plt.subplots(
        nrow, cols, figsize=(max(9.0, 4.6 * cols), 3.8 * nrow + 0.6), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = _PLACEMENT_MARKERS

    def style(r: dict) -> dict:
        return dict(
            color=colors[drifts.index(r["drift"]) % len(colors)],
            marker=markers[policies.index(r["policy"]) % len(markers)],
        )

    for k, shape in enumerate(shapes):
        _placement_panel(
            axes[k // cols][k % cols], fig, [r for r in good if r["shape"] == shape], style
        )
    for k in range(len(shapes), nrow * cols):
        axes[k // cols][k % cols].axis("off")
    handles = _placement_legend(plt, policies, drifts, colors)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8)
    fig.suptitle(
        f"EPLB placement: bytes moved vs imbalance, mean over the rebalances"
        f" ({meta.get('mode', 'cpu')})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path, 110)


def make_plots(out_dir: str, rows: list[dict], meta: dict) -> tuple[list[str], str | None]:
    """Write the PNGs that have data. Returns (paths, reason if plotting is unavailable)."""
    try:
        _plt()
    except Exception as e:  # noqa: BLE001
        return [], f"matplotlib unavailable ({type(e).__name__}: {e})"
    paths = []
    for part in BW_PARTS:
        p = plot_bandwidth(os.path.join(out_dir, f"{part}_busbw.png"), part, rows, meta)
        if p:
            paths.append(p)
    for fn, name in (
        (plot_overhead, "overhead_host.png"),
        (plot_eplb, "eplb.png"),
        (plot_placement, "placement.png"),
    ):
        p = fn(os.path.join(out_dir, name), rows, meta)
        if p:
            paths.append(p)
    return paths, None


# --------------------------------------------------------------------------------------------
# CPU self-check: statistics, tables, JSON, Markdown and plots on synthetic rows
# --------------------------------------------------------------------------------------------


def _synthetic_bandwidth(n: int) -> list[dict]:
    """Synthetic sendrecv and alltoall rows of every binding, and one binding's error."""
    rows: list[dict] = []
    for part, bus in (("sendrecv", 1.0), ("alltoall", (n - 1) / n)):
        for b, peak in (
            ("eplb_pynccl", 360.0),
            ("cupy", 358.0),
            ("torch", 340.0),
            ("nccl4py", 355.0),
        ):
            size = 8
            while size <= 1 << 30:
                t = 20.0 + size / (peak * 1e3)
                alg = size / t / 1e3
                rows.append(
                    {
                        "part": part,
                        "binding": b,
                        "world_size": n,
                        "size_bytes": size,
                        "time_us": t,
                        "time_us_min": t * 0.97,
                        "time_us_max": t * 1.1,
                        "algbw_gbps": alg,
                        "busbw_gbps": alg * bus,
                        "check": "ok",
                        "iters": 20,
                        "repeats": 5,
                        "note": "",
                    }
                )
                size *= 4
    rows.append(
        {"part": "sendrecv", "binding": "nccl4py", "world_size": n, "error": "ImportError: x"}
    )
    return rows


def _synthetic_overhead(n: int) -> list[dict]:
    """Synthetic host overhead rows of every binding."""
    rows: list[dict] = []
    for b, h in (
        ("eplb_pynccl", 1.2),
        ("eplb_pynccl[raw]", 0.9),
        ("cupy", 0.6),
        ("torch", 19.6),
        ("nccl4py", 3.1),
    ):
        rows.append(
            {
                "part": "overhead",
                "binding": b,
                "world_size": n,
                "ops_per_rank": 512,
                "op_bytes": 4096,
                "host_us_per_op": h,
                "host_us_per_op_p90": h * 1.2,
                "e2e_us_per_op": h + 2.5,
                "host_ratio_vs_cupy": h / 0.6,
                "check": "ok",
                "repeats": 50,
            }
        )
    return rows


def _synthetic_eplb(n: int) -> list[dict]:
    """Synthetic EPLB rows of two cases, and a planner row."""
    rows: list[dict] = []
    for case in ("dsv3-fp8 ep4 4L", "qwen3 ep4 8L"):
        for m, t in (
            ("vllm-style", 61.3),
            ("naive-pack", 86.4),
            ("eplb_pynccl", 30.0),
            ("link-floor", 25.7),
        ):
            rows.append(
                {
                    "part": "eplb",
                    "case": case,
                    "method": m,
                    "time_ms": t,
                    "gbps_per_gpu": 8.63e9 / (t * 1e-3) / 1e9,
                    "world_size": n,
                }
            )
    rows.append(
        {
            "part": "planner",
            "layers": 58,
            "ep": 8,
            "ranks_per_node": None,
            "median_ms": 3.2,
            "p90_ms": 3.9,
        }
    )
    return rows


def _synthetic_placement() -> list[dict]:
    """Synthetic placement rows of two drifts, and a target row."""
    rows: list[dict] = []
    for drift, k in (("steady", 1.0), ("regime", 2.0)):
        for pol, imb, gib in (
            ("deepseek", 1.08, 18.0),
            ("deepseek relabelled", 1.08, 15.0),
            ("migration_aware", 1.07, 0.4 * k),
            ("keep old", 1.1 * k, 0.0),
        ):
            rows.append(
                {
                    "part": "placement",
                    "shape": "dsv3 ep32 4n",
                    "drift": drift,
                    "policy": pol,
                    "rebalances": 20,
                    "imb_mean": imb,
                    "imb_max": imb + 0.3,
                    "excess_pct": 100 * (imb - 1),
                    "excess_pct_max": 100 * (imb - 0.7),
                    "changed_pct": 80.0 if gib > 1 else 2.0,
                    "recv_max_gib": gib,
                    "recv_max_gib_peak": gib * 1.1,
                    "internode_gib": gib * 2,
                    "ms_median": 25.0,
                    "ms_max": 40.0,
                    "bytes_vs_deepseek": gib / 18.0,
                }
            )
    rows.append(
        {
            "part": "placement-targets",
            "shape": "dsv3 ep32 4n",
            "drift": "steady",
            "target": "policy time <= 50 ms",
            "measured": "25.0 ms",
            "status": "met",
        }
    )
    return rows


def synthetic_rows(world_size: int = 4) -> list[dict]:
    n = world_size
    return (
        _synthetic_bandwidth(n)
        + _synthetic_overhead(n)
        + _synthetic_eplb(n)
        + _synthetic_placement()
    )


def _check_statistics() -> None:
    """selfcheck: the statistics and formatting helpers on known values."""
    from .harness import normalize_rows, parse_bytes, percentile, size_series, summarize

    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 90) == 5
    s = summarize([3.0, 1.0, 2.0, 100.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 100.0 and s["n"] == 4, s
    assert math.isnan(summarize([])["median"])
    assert size_series(8, 1 << 30)[:3] == [8, 32, 128] and size_series(8, 1 << 30)[-2:] == [
        1 << 29,
        1 << 30,
    ]
    assert size_series(8, 32) == [8, 32]
    assert parse_bytes("4K") == 4096 and parse_bytes("1G") == 1 << 30 and parse_bytes("8") == 8
    assert parse_bytes("16MiB") == 16 << 20
    assert fmt_bytes(8) == "8 B" and fmt_bytes(4096) == "4 KiB" and fmt_bytes(1 << 30) == "1 GiB"
    assert (
        fmt_bytes(3 << 19) == "1.5 MiB"
        and fmt_bytes(1000) == "1,000 B"
        and fmt_bytes(4092) == "4,092 B"
    )
    import numpy as np

    nr = normalize_rows([{"x": np.float32(1.5), "y": np.int64(3)}], "p")
    assert nr == [{"part": "p", "x": 1.5, "y": 3}] and type(nr[0]["y"]) is int, nr
    # the CUDA-event arithmetic of micro._time_gpu: ms * 1e3 / iters = µs per iteration
    assert abs(2.0 * 1e3 / 20 - 100.0) < 1e-12


def _check_tables(rows: list[dict], meta: dict, parts: dict, verbose: bool) -> list[str]:
    """selfcheck: every part's table, the highlights and the markdown summary of ``rows``;
    returns the highlights."""
    for p in parts:
        h, c = part_table(p, [r for r in rows if r["part"] == p])
        assert c and all(len(r) == len(h) for r in c), (p, h, c[:1])
        t = text_table(h, c)
        assert t.count("\n") == len(c) + 1
        if verbose:
            print(f"--- {p}\n{t}")
    h, c = part_table("sendrecv", [r for r in rows if r["part"] == "sendrecv"])
    assert (
        h[0] == "size" and "eplb_pynccl busbw" in h and c[0][0] == "8 B" and c[-1][0] == "512 MiB"
    ), (h, c[-1])
    hl = highlights(rows)
    assert any("eplb_pynccl host 1.20 us/op = 2.00x cupy" in x and "meets" in x for x in hl), hl
    assert any("eplb_pynccl[raw]" in x and "1.50x" in x for x in hl), hl
    assert "placement targets: 1 met, 0 MISSED" in " ".join(hl), hl
    h, c = part_table("placement", [r for r in rows if r["part"] == "placement"])
    assert h[:3] == ["shape", "drift", "policy"] and len(c) == 8, (h, c[:1])
    md = markdown_summary(meta, parts, rows)
    assert md.count("## ") >= 6 and "| size |" in md and "error: nccl4py: ImportError: x" in md, md[
        :500
    ]
    return hl


def selfcheck(out_dir: str | None = None, verbose: bool = True) -> list[str]:
    """Exercise the statistics and every output path on synthetic rows. Returns the files written."""
    import tempfile

    _check_statistics()
    # tables
    rows = synthetic_rows()
    meta = {
        "date": "2026-01-01T00:00:00Z",
        "hostname": "selfcheck",
        "mode": "gpu",
        "world_size": 4,
        "gpu_names": ["synthetic data (selfcheck)"] * 4,
        "nccl_versions": {"torch": "2.28.9"},
        "argv": ["bench.run", "--selfcheck"],
        "seed": 0,
    }
    parts = {
        p: {"status": "ok", "seconds": 1.0}
        for p in (
            "sendrecv",
            "alltoall",
            "overhead",
            "eplb",
            "planner",
            "placement",
            "placement-targets",
        )
    }
    hl = _check_tables(rows, meta, parts, verbose)
    # files
    out_dir = out_dir or tempfile.mkdtemp(prefix="bench_selfcheck_")
    os.makedirs(out_dir, exist_ok=True)
    written = [
        write_json(
            os.path.join(out_dir, "results.json"),
            meta,
            parts,
            rows + [{"part": "x", "v": float("nan")}],
        )
    ]
    with open(written[0]) as f:
        back = json.load(f)
    assert back["rows"][-1]["v"] is None and len(back["rows"]) == len(rows) + 1
    plots, why = make_plots(out_dir, rows, meta)
    if why is None:
        assert len(plots) == 5 and all(os.path.getsize(p) > 1000 for p in plots), plots
    written += plots
    written.append(write_markdown(os.path.join(out_dir, "summary.md"), meta, parts, rows, plots))
    if verbose:
        print("\n".join(hl))
        print(
            f"selfcheck ok; wrote {len(written)} files to {out_dir}" + (f" ({why})" if why else "")
        )
    return written


if __name__ == "__main__":
    selfcheck()
