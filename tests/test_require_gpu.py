"""``make test-gpu`` does not pass green when it ran nothing (issue 22 item 9): with
EPLB_PYNCCL_REQUIRE_GPU=1, tests/require_gpu.py turns a run in which no test passed into a
failure; without it (a CPU machine's default) such a run still exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_TESTS = """
import pytest

@pytest.mark.skip(reason="GPU test: no GPU here")
def test_needs_a_gpu():
    pass

def test_runs_anywhere():
    assert RUNS
"""


def _pytest(tmp_path, required: str | None, runs: bool):
    (tmp_path / "test_fake_gpu.py").write_text(_TESTS.replace("RUNS", str(runs)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EPLB_PYNCCL_REQUIRE_GPU", None)
    if required is not None:
        env["EPLB_PYNCCL_REQUIRE_GPU"] = required
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "tests.require_gpu",
        "-p",
        "no:cacheprovider",
    ]
    if not runs:
        args += ["-k", "needs_a_gpu"]
    return subprocess.run(
        [*args, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )


def test_every_test_skipped_fails_when_a_gpu_is_required(tmp_path):
    r = _pytest(tmp_path, "1", runs=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        "EPLB_PYNCCL_REQUIRE_GPU=1 and no test passed (1 skipped): this machine cannot run the "
        "GPU suite (skip reasons below)"
    ) in r.stdout


@pytest.mark.parametrize("required", [None, "0", ""])
def test_every_test_skipped_passes_when_no_gpu_is_required(tmp_path, required):
    r = _pytest(tmp_path, required, runs=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no test passed" not in r.stdout


def test_a_run_where_a_test_passed_is_left_alone(tmp_path):
    r = _pytest(tmp_path, "1", runs=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_make_test_gpu_loads_the_plugin_and_requires_a_gpu_where_nvidia_smi_sees_one():
    env = dict(os.environ)
    env.pop("EPLB_PYNCCL_REQUIRE_GPU", None)
    r = subprocess.run(
        ["make", "-n", "test-gpu", f"PYTHON={sys.executable}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    cmd = " ".join(r.stdout.replace("\\\n", " ").split())
    has_gpu = subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0
    assert f"EPLB_PYNCCL_REQUIRE_GPU=${{EPLB_PYNCCL_REQUIRE_GPU:-{1 if has_gpu else 0}}}" in cmd
    assert f"{sys.executable} -m pytest tests -m gpu -p tests.require_gpu" in cmd
