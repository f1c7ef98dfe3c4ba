"""`make bench`'s command line and output (CPU): bad flags refused, flags honoured, readable
figures. Each case was something a new user hit (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--eplb-methods", "bogus"], "--eplb-methods: unknown 'bogus'; known: eplb_pynccl, "),
        (["--eplb-cases", "dsv3,bogus"], "--eplb-cases: unknown 'bogus'; known: dsv3, "),
        (["--cpu-procs", "0"], "--cpu-procs must be >= 1, got 0"),
        (["--eplb-layers-dsv3", "0"], "--eplb-layers-dsv3 must be >= 1, got 0"),
        (["--parts", "bogus"], "unknown part 'bogus'"),
    ],
)
def test_bad_flags_are_refused_with_exit_status_2(args, msg):
    r = _bench(*args)
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    assert msg in r.stderr, r.stderr


def test_help_states_each_default_once():
    from bench.run import build_parser

    ap = build_parser()
    fmt = ap.formatter_class(prog="x")
    for a in ap._actions:
        if not a.help or a.help == "==SUPPRESS==":
            continue
        h = fmt._expand_help(a)  # the help text with the default the formatter appends
        assert h.count("(default") <= 1, (a.dest, h)


def test_the_makefile_points_to_a_bench_readme_that_exists():
    text = (ROOT / "Makefile").read_text()
    assert "bench/README.md" in text and (ROOT / "bench" / "README.md").exists()


def test_cpu_mode_honours_layers_and_methods_and_keeps_small_figures(tmp_path):
    r = _bench(
        "--parts",
        "eplb",
        "--eplb-cases",
        "dsv3-cpu",
        "--eplb-layers-dsv3",
        "3",
        "--eplb-methods",
        "vllm-style",
        "--eplb-repeats",
        "1",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    (row,) = [x for x in rows if x["part"] == "eplb"]
    assert row["layers"] == 3 and row["method"] == "vllm-style" and row["check"] == "ok"
    assert row["gbps_per_gpu"] > 0 and row["layer_mib_per_gpu"] > 0  # not rounded to 0
    # a method that does not run in this mode is an error, not an empty success
    r = _bench(
        "--parts",
        "eplb",
        "--eplb-cases",
        "dsv3-cpu",
        "--eplb-methods",
        "eplb_pynccl",
        "--eplb-repeats",
        "1",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 1
    assert (
        "none of them runs in CPU mode here (these do: eplb_pynccl/gloo, vllm-style)"
        in r.stdout + r.stderr
    )


def test_eplb_plot_starts_at_zero_and_selfcheck_says_its_data_is_synthetic(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import report

    rows = [
        {"part": "eplb", "case": "c", "method": m, "time_ms": 4.0, "gbps_per_gpu": 0.009}
        for m in ("a", "b")
    ]
    fig = report.eplb_figure(rows, {"world_size": 2, "mode": "cpu"})
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0
    assert max(p.get_height() for p in fig.axes[1].patches) == pytest.approx(0.009)
    written = report.selfcheck(str(tmp_path), verbose=False)
    md = next(p for p in written if p.endswith("summary.md"))
    assert "synthetic data (selfcheck)" in Path(md).read_text()
    assert "H100" not in Path(md).read_text()
