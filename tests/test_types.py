"""What a type checker and an interactive session see of the package (issue 22 item 8): the
names that load on first use are typed (not ``Any``) and listed by ``dir()``, and the public
dataclasses' signatures show no private fields."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import eplb_pynccl as ep

ROOT = Path(__file__).resolve().parents[1]


def _type_checking_imports() -> dict[str, str]:
    """name -> module of every import under ``if TYPE_CHECKING:`` in the package's __init__."""
    tree = ast.parse((ROOT / "eplb_pynccl" / "__init__.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname in (None, alias.name), ast.dump(imp)
                    out[alias.name] = "." + imp.module if imp.module else "." + alias.name
    return out


def test_type_checking_block_names_every_lazy_name_and_submodule():
    seen = _type_checking_imports()
    expected = dict(ep._LAZY)
    expected.update({m: "." + m for m in ep._SUBMODULES})
    assert seen == expected


def test_all_lists_the_eager_and_the_lazy_names_once():
    assert len(ep.__all__) == len(set(ep.__all__))
    assert set(ep._LAZY) <= set(ep.__all__)
    for name in ep.__all__:  # each one resolves (this loads the lazy modules)
        assert getattr(ep, name) is not None, name


def test_dir_lists_the_lazy_names_before_they_load():
    # a fresh interpreter: in this one other tests have loaded them already
    code = (
        "import eplb_pynccl as ep, sys\n"
        "assert 'eplb_pynccl.placement' not in sys.modules\n"
        "print(' '.join(dir(ep)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    names = set(r.stdout.split())
    missing = (set(ep.__all__) | set(ep._SUBMODULES)) - names
    assert not missing, sorted(missing)
    assert "__version__" in names


def test_mypy_types_the_lazy_names(tmp_path):
    pytest.importorskip("mypy")
    snippet = tmp_path / "use_it.py"
    snippet.write_text(
        "from eplb_pynccl import ExpertShuffler, rebalance, plan_rearrangement\n"
        "import eplb_pynccl\n"
        "reveal_type(rebalance)\n"
        "reveal_type(plan_rearrangement)\n"
        "reveal_type(ExpertShuffler)\n"
        "reveal_type(eplb_pynccl.schedule)\n"
        "r = rebalance([[1.0, 2.0]], 2, 1)\n"
        "reveal_type(r.new_map)\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--follow-imports=silent",
            "--no-error-summary",
            str(snippet),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    notes = [line.split("note: Revealed type is ", 1)[1] for line in r.stdout.splitlines()]
    assert len(notes) == 5, r.stdout + r.stderr
    assert '"Any"' not in notes, notes  # what a module __getattr__ alone gives
    assert notes[0].startswith('"def (loads: ') and "RebalanceResult" in notes[0], notes[0]
    assert "RearrangementPlan" in notes[1], notes[1]
    assert notes[2].startswith('"def (') and "ExpertShuffler" in notes[2], notes[2]
    assert notes[3] == '"types.ModuleType"', notes[3]
    assert "ndarray" in notes[4], notes[4]


@pytest.mark.parametrize("name", ["RebalanceResult", "RearrangeStats", "RearrangementPlan"])
def test_public_signatures_show_no_private_fields(name):
    params = inspect.signature(getattr(ep, name)).parameters
    assert not [p for p in params if p.startswith("_")], list(params)
