"""What a new user meets when installing (issue 16): the sdist carries the tests' helpers and
the examples, the licence is declared the current way, a missing extra names itself, and the
README's example runs through make."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_copy(dest: Path) -> Path:
    """The files a fresh clone has (in a git checkout: tracked and not ignored; else all but
    build output), copied to ``dest``: setuptools adds the files listed in an existing
    ``*.egg-info/SOURCES.txt`` (left by ``pip install -e .``) to the sdist, which would hide a
    file MANIFEST.in misses, and building writes that directory into the source tree."""
    if (ROOT / ".git").exists():
        files = (
            subprocess.run(
                ["git", "ls-files", "-co", "--exclude-standard", "-z"],
                capture_output=True,
                cwd=ROOT,
                check=True,
            )
            .stdout.decode()
            .split("\0")
        )
    else:
        skip = ("build/", "dist/", ".venv")
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file()
            and ".egg-info" not in str(p)
            and not str(p.relative_to(ROOT)).startswith(skip)
        ]
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a deleted, not yet committed file is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist built from this checkout (offline: the build backend of this environment),
    its build output, and the directory it unpacks to."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("sdist")
    src = _clean_copy(out / "checkout")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "--outdir",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (path,) = out.glob("eplb_pynccl-*.tar.gz")
    with tarfile.open(path) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(out, filter="data")
        else:  # Python before 3.10.12 / 3.11.4; our own archive
            tf.extractall(out)
    (unpacked,) = (d for d in out.iterdir() if d.is_dir() and d != src)
    return path, r, unpacked


def test_sdist_has_the_test_helpers_examples_and_licence(sdist):
    path, r, _ = sdist
    assert (
        "License classifiers are deprecated" not in r.stderr
        and "project.license` as a TOML table" not in r.stderr
    )
    with tarfile.open(path) as tf:
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
        "tests_vllm/conftest.py",
        "tests_vllm/util.py",
        "tests_sglang/conftest.py",
        "examples/shuffle_gloo.py",
        "bench/run.py",
        "csrc_headers/eplb_nccl.h",
    ):
        assert need in names, need
    assert not any(n.startswith("bench/results/") for n in names)
    assert "License-Expression: Apache-2.0" in pkg_info
    # no shipped file sends its reader to notes outside the repository (the project's
    # shared/ directory, which a clone or an sdist does not have)
    unpacked = sdist[2]
    pointing = [
        n
        for n in sorted(names)
        if (unpacked / n).is_file()
        and n.endswith((".py", ".txt", ".md", ".toml", ".in", "Makefile"))
        and re.search(r"(?<![\w./-])shared/\w", (unpacked / n).read_text(errors="replace"))
    ]
    assert not pointing, pointing
    if (ROOT / ".git").exists():  # every file the suites and make's rules read is shipped
        tracked = subprocess.run(
            ["git", "ls-files", "tests", "tests_vllm", "tests_sglang"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.split()
        assert tracked and not sorted(set(tracked) - names)


def _local_imports(root: Path) -> set[str]:
    """Every absolute import of a module of this source tree (the package, the test suites,
    bench, tools), at any depth of the files of the suites, bench, tools and examples."""
    local = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found = set()
    for d in ("tests", "tests_vllm", "tests_sglang", "bench", "tools", "examples"):
        for f in (root / d).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                elif isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                else:
                    continue
                found.update(m for m in mods if m.split(".")[0] in local)
    return found


def _assert_imports_its_own_package(src: Path, env: dict[str, str]) -> None:
    """eplb_pynccl imported from the unpacked sdist ``src``, not from elsewhere."""
    where = subprocess.run(
        [sys.executable, "-c", "import eplb_pynccl; print(eplb_pynccl.__file__)"],
        capture_output=True,
        text=True,
        cwd=src,
        env=env,
        timeout=120,
    )
    assert Path(where.stdout.strip()).is_relative_to(src), where.stdout + where.stderr


def _assert_suites_collect(src: Path, env: dict[str, str]) -> None:
    """The three suites collect without errors, each with tests."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests",
            "tests_vllm",
            "tests_sglang",
        ],
        capture_output=True,
        text=True,
        cwd=src,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ tests collected in .*", last), r.stdout[-3000:]
    for suite in ("tests/", "tests_vllm/", "tests_sglang/"):
        assert any(line.startswith(suite) for line in r.stdout.splitlines()), suite


def _make_lint_ruff_commands(src: Path, env: dict[str, str]) -> list[str]:
    """make -n of the lint, test-vllm and test-sglang rules works; make lint's two ruff
    command lines."""
    make = subprocess.run(
        ["make", "-n", "lint", "test-vllm", "test-sglang", f"PY={sys.executable}", "SETUP="],
        capture_output=True,
        text=True,
        cwd=src,
        env=env,
        timeout=120,
    )
    assert make.returncode == 0, make.stdout + make.stderr
    ruff = [line for line in make.stdout.splitlines() if " -m ruff " in line]
    assert len(ruff) == 2, make.stdout
    return ruff


def test_sdist_runs_its_own_suites_and_make_rules(sdist):
    """From the unpacked sdist (issue 22 item 2): the three suites collect without errors,
    every local module their files import exists (tests import tests_vllm's helpers inside
    test functions, which collection does not see), the Makefile has the lint, test-vllm and
    test-sglang rules with what they need, and make lint's ruff runs pass there."""
    _, _, src = sdist
    env = dict(os.environ, PYTHONPATH=str(src))
    _assert_imports_its_own_package(src, env)
    _assert_suites_collect(src, env)

    missing = sorted(
        m
        for m in _local_imports(src)
        if not any((src / (m.replace(".", "/") + t)).exists() for t in (".py", "/__init__.py"))
    )
    assert not missing, missing

    ruff = _make_lint_ruff_commands(src, env)
    pytest.importorskip("ruff")
    for cmd in ruff:
        run = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=src, timeout=300)
        assert run.returncode == 0, cmd + "\n" + run.stdout[-3000:] + run.stderr[-2000:]


def test_make_lint_runs_the_pinned_ruff_and_mypy():
    """The versions come from pyproject.toml's lint extra (the test extra includes it)."""
    text = (ROOT / "pyproject.toml").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("lint = [")]
    pins = re.findall(r'"([a-z]+)==([0-9][^"]*)"', line)
    assert [name for name, _ in pins] == ["ruff", "mypy"]
    make = subprocess.run(
        ["make", "-n", "lint", f"PY={sys.executable}", "SETUP="],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert make.returncode == 0, make.stderr
    want = " ".join(f"{n}=={v}" for n, v in pins)
    assert f"{sys.executable} -m pip install -q {want}" in make.stdout, make.stdout
    assert f"{sys.executable} -m mypy" in make.stdout.splitlines()
    for name, version in pins:  # where installed, the pinned one
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            assert importlib.metadata.version(name) == version, name


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
        "TorchTransport needs PyTorch, which is not installed: pip install torch (a build for "
        "your CUDA version; README 'Install': the package's torch extra, or a CPU build)"
    ), r.stdout + r.stderr
