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


def _bench(*args, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        env=dict(ENV, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--eplb-methods", "bogus"], "--eplb-methods: unknown 'bogus'; known: eplb_pynccl, "),
        (["--eplb-cases", "dsv3,bogus"], "--eplb-cases: unknown 'bogus'; known: dsv3, "),
        (["--cpu-procs", "0"], "argument --cpu-procs: must be an integer >= 1, got '0'"),
        (["--eplb-layers-dsv3", "0"], "argument --eplb-layers-dsv3: must be an integer >= 1"),
        (["--parts", "bogus"], "--parts: unknown part 'bogus'"),
        # issue 22 item 6: each of these was a traceback, a silent default or a wrong status
        (["--planner-repeats", "0"], "argument --planner-repeats: must be an integer >= 1"),
        (["--placement-steps", "0"], "argument --placement-steps: must be an integer >= 1"),
        (["--eplb-repeats", "0"], "argument --eplb-repeats: must be an integer >= 1"),
        (["--eplb-seq-steps", "0"], "argument --eplb-seq-steps: must be an integer >= 1"),
        (["--timeout", "0"], "argument --timeout: must be a finite number of seconds > 0"),
        (["--timeout", "-5"], "argument --timeout: must be a finite number of seconds > 0"),
        (["--timeout", "nan"], "argument --timeout: must be a finite number of seconds > 0"),
        (["--stall-timeout", "0"], "argument --stall-timeout: must be a finite number"),
        (["--gpus", "-1"], "argument --gpus: must be an integer >= 0, got '-1'"),
        (["--placement-shapes", "nope"], "--placement-shapes: unknown 'nope'; known: dsv3-ep8"),
        (["--placement-drifts", "nope"], "--placement-drifts: unknown 'nope'; known: steady"),
        (["--stress-variants", "nope"], "--stress-variants: unknown 'nope'; known: default"),
        (["--bindings", "nope"], "--bindings: unknown 'nope'; known: eplb_pynccl"),
        (["--parts", ""], "--parts '' names no part; known: sendrecv"),
        (["--parts", " , "], "--parts ' , ' names no part"),
        (["--master-port", "70000"], "argument --master-port: must be a TCP port"),
        (["--min-bytes", "0"], "argument --min-bytes: must be a size >= 1 byte"),
    ],
)
def test_bad_flags_are_refused_with_exit_status_2(args, msg, capsys):
    from bench.run import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--out", os.devnull + "-never-written"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert msg in err, err


@pytest.mark.parametrize("out", ["FILE", "/proc/x"])
def test_an_unusable_out_is_refused_before_any_part_runs(out, tmp_path, capsys):
    from bench.run import main

    if out == "FILE":
        out = str(tmp_path / "a-file")
        Path(out).write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--parts", "planner", "--out", out])
    cap = capsys.readouterr()
    assert e.value.code == 2
    assert f"--out {out!r} is not a directory this process can write" in cap.err
    assert "running planner" not in cap.out  # nothing ran


def test_a_case_that_cannot_fit_cpu_mode_is_refused_with_the_memory_it_needs(capsys):
    from bench.run import main

    with pytest.raises(SystemExit) as e:
        main(["--cpu", "--parts", "eplb", "--eplb-cases", "dsv3", "--out", os.devnull + "-x"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    # 2 ranks x (4 layers + 2 of staging) x 144 rows x 42.0 MiB
    assert "--eplb-cases: dsv3 needs about 70.9 GiB of host memory in CPU mode (2 ranks x " in err
    assert "(4 layers + 2 of staging) x 6,049 MiB); " in err and "GiB is available" in err


def test_cpu_procs_3_runs_every_cpu_case(tmp_path):
    r = _bench(
        "--parts",
        "eplb",
        "--cpu-procs",
        "3",
        "--eplb-repeats",
        "1",
        "--eplb-seq-steps",
        "1",
        "--out",
        str(tmp_path),
        "--no-plots",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    cases = {x["case"] for x in rows if x["part"] == "eplb"}
    assert cases == {"dsv3-cpu ep3 2L", "qwen3-cpu ep3 2L", "dsv3-seq-cpu ep3 2L x1"}, cases
    assert all(x["check"] == "ok" for x in rows if "check" in x)


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


def test_a_rank_that_dies_ends_the_run_at_once_naming_its_exit_code(tmp_path):
    import time

    stamp = tmp_path / "death"
    r = _bench(
        "--parts",
        "tests.bench_parts:die_while_peer_is_busy",
        "--out",
        str(tmp_path),
        "--no-plots",
        env={"EPLB_PYNCCL_TEST_DEATH_STAMP": str(stamp)},
    )
    after_death = time.time() - float(stamp.read_text())
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-2000:]
    assert "rank 1 died with exit code 9" in out, out[-2000:]
    # from the death to the end of the run: a 2 s grace and the teardown, not the 20 s kill
    # after an error nor the survivor's 120 s (timed from the death: start-up on a loaded
    # machine is not part of it)
    assert after_death < 12, (after_death, out[-2000:])
