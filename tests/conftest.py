"""Shared test configuration.

* ``pytest.mark.gpu`` tests are skipped, with the reason shown, when torch cannot see CUDA
  devices or the machine has fewer GPUs than the test needs. A test needs
  ``max(gpus=..., world_size)`` GPUs: ``@pytest.mark.gpu(gpus=2)`` and/or the ``world_size``
  parameter below.
* ``world_size``: a test that takes this argument runs once per size in
  ``$EPLB_PYNCCL_TEST_WORLD_SIZES`` (comma separated, default ``2,4,8``); sizes the machine
  cannot run are skipped, never silently dropped. The parameter is module scoped so pytest
  runs all tests of one size before the next (the GPU suite keeps one process pool per size).
"""

from __future__ import annotations

import os

import pytest

WORLD_SIZES_ENV = "EPLB_PYNCCL_TEST_WORLD_SIZES"
DEFAULT_WORLD_SIZES = (2, 4, 8)

_gpu_probe: tuple[int, str | None] | None = None


def world_sizes() -> tuple[int, ...]:
    raw = os.environ.get(WORLD_SIZES_ENV, "").strip()
    if not raw:
        return DEFAULT_WORLD_SIZES
    try:
        sizes = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise pytest.UsageError(
            f"{WORLD_SIZES_ENV}={raw!r}: expected comma-separated integers, e.g. 2,4"
        ) from None
    if not sizes or any(n < 1 for n in sizes):
        raise pytest.UsageError(f"{WORLD_SIZES_ENV}={raw!r}: world sizes must be >= 1")
    return sizes


def gpu_probe() -> tuple[int, str | None]:
    """(number of CUDA devices torch sees, why none can be used or None). Cached."""
    global _gpu_probe
    if _gpu_probe is None:
        try:
            import torch
        except Exception as e:  # ImportError, or a broken install
            _gpu_probe = (0, f"GPU test: torch is not importable ({type(e).__name__}: {e})")
        else:
            if not torch.cuda.is_available():
                _gpu_probe = (0, "GPU test: torch.cuda is not available (no NVIDIA driver or GPU)")
            else:
                _gpu_probe = (torch.cuda.device_count(), None)
    return _gpu_probe


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(gpus=1): needs CUDA devices (run with `make test-gpu`)")


def pytest_generate_tests(metafunc):
    if "world_size" in metafunc.fixturenames:
        metafunc.parametrize("world_size", world_sizes(), ids=lambda n: f"ws{n}", scope="module")


def _needed_gpus(item) -> int:
    marker = item.get_closest_marker("gpu")
    need = int(marker.kwargs.get("gpus", 1)) if marker is not None else 1
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "world_size" in callspec.params:
        need = max(need, int(callspec.params["world_size"]))
    return need


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    count, reason = gpu_probe()
    for item in gpu_items:
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
            continue
        need = _needed_gpus(item)
        if count < need:
            item.add_marker(
                pytest.mark.skip(reason=f"GPU test needs {need} GPUs; this machine has {count}")
            )
