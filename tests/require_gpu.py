"""pytest plugin of ``make test-gpu`` (``-p tests.require_gpu``): with
``EPLB_PYNCCL_REQUIRE_GPU=1`` a run in which no test passed fails (exit 1) instead of passing
green with every GPU test skipped, as it would on a runner without a GPU or with a CPU torch.

``make test-gpu`` sets the variable to 1 when ``nvidia-smi`` lists a GPU (and leaves a value
given in the environment alone); CI's GPU job sets it.
"""

from __future__ import annotations

import os

import pytest

VARIABLE = "EPLB_PYNCCL_REQUIRE_GPU"


def _required() -> bool:
    return os.environ.get(VARIABLE, "").strip() not in ("", "0")


class _Outcomes:
    def __init__(self) -> None:
        self.passed = 0
        self.skipped = 0
        self.failed_run = False

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.skipped:
            self.skipped += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if _required() and not self.passed and exitstatus in (0, 5):
            self.failed_run = True
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.failed_run:
            terminalreporter.write_line(
                f"{VARIABLE}=1 and no test passed ({self.skipped} skipped): this machine "
                "cannot run the GPU suite (skip reasons below)",
                red=True,
                bold=True,
            )


def pytest_configure(config) -> None:
    config.pluginmanager.register(_Outcomes(), "eplb_pynccl_require_gpu")
