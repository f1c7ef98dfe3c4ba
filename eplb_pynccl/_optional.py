"""Optional dependencies, imported on first use with an install hint when they are missing."""

from __future__ import annotations

import importlib
import sys


def torch(what: str = "this feature"):
    """The torch module; ModuleNotFoundError naming the extra to install when it is missing."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"{what} needs PyTorch, which is not installed: pip install torch (a build for your "
            "CUDA version; README 'Install': the package's torch extra, or a CPU build)",
            name="torch",
        ) from None
