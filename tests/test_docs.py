"""The README tells a new user what exists (issue 22 item 10): every make target, every extra
and how to install a package that is on no index."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_every_make_target_is_documented():
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert "clean" in phony
    undocumented = [t for t in phony if f"`make {t}" not in README]
    assert not undocumented, undocumented


def test_install_lists_every_extra_and_no_index_install():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([a-z0-9]+) = \[", block, re.M)
    assert {"torch", "cu12", "cu13", "placement", "bench", "test", "lint"} <= set(extras)
    install = _section("Install")
    missing = [e for e in extras if f"`{e}`" not in install]
    assert not missing, missing
    # the package is on no index: no command that fetches it by name
    assert not re.search(r"pip install ['\"]?eplb-pynccl", README)
    assert "pip install '.[torch,cu12]'" in install and "python -m build --wheel" in install
    assert "https://download.pytorch.org/whl/cpu" in install
