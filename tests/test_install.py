"""What a new user meets when installing (issue 16): the sdist carries the tests' helpers and
the examples, the licence is declared the current way, a missing extra names itself, and the
README's example runs through make."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_has_the_test_helpers_examples_and_licence(tmp_path):
    pytest.importorskip("build")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (
        "License classifiers are deprecated" not in r.stderr
        and "project.license` as a TOML table" not in r.stderr
    )
    (sdist,) = tmp_path.glob("eplb_pynccl-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        pkg_info = (
            tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith("/PKG-INFO")))
            .read()
            .decode()
        )
    for need in (
        "LICENSE",
        "Makefile",
        "tests/conftest.py",
        "tests/gpu_util.py",
        "tests/shuffle_util.py",
        "tests/header_parse.py",
        "examples/shuffle_gloo.py",
        "bench/run.py",
        "csrc_headers/eplb_nccl.h",
    ):
        assert need in names, need
    assert not any(n.startswith("bench/results/") for n in names)
    assert "License-Expression: Apache-2.0" in pkg_info


def test_missing_torch_names_the_extra_to_install():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import eplb_pynccl as ep\n"
        "try:\n    ep.TorchTransport()\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.stdout.strip() == (
        "TorchTransport needs PyTorch, which is not installed: pip install 'eplb-pynccl[torch]' "
        "(or a torch build for your CUDA version)"
    ), r.stdout + r.stderr
