"""The README's runnable example runs and checks itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def test_shuffle_gloo_example_runs_through_make():
    # `make example`, as the README says, with this Python (it has what the example needs)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FORCE_VENV", None)
    r = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "example", f"PYTHON={sys.executable}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the two processes print concurrently: match records, not lines
    ranks = sorted(re.findall(r"rank (\d): \d+ transfers in the plan;.*?round\(s\): OK", r.stdout))
    assert ranks == ["0", "1"], r.stdout
