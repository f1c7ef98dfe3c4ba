"""Regenerate eplb_pynccl/_nccl/rowcopy.ptx from rowcopy.cu (needs nvcc; run from the repo root).

The PTX is compiled for compute_75 (the oldest target CUDA 13's nvcc has) and its ISA version
is lowered to 7.0, which CUDA 11.0+ drivers read: the kernel uses nothing newer (ptxas checks
that, for sm_75 and sm_90, when this script runs). The driver compiles the PTX at load time.

    python tools/build_rowcopy.py           # rewrite the .ptx
    python tools/build_rowcopy.py --check   # exit 1 if the committed .ptx differs
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent.parent / "eplb_pynccl" / "_nccl"
SRC, PTX = HERE / "rowcopy.cu", HERE / "rowcopy.ptx"
PTX_ISA = "7.0"


def build() -> str:
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "k.ptx"
        subprocess.run(
            ["nvcc", "-ptx", "-arch=compute_75", "-O3", str(SRC), "-o", str(out)], check=True
        )
        text = re.sub(r"(?m)^\.version .*$", f".version {PTX_ISA}", out.read_text())
        # the compiler's build id lines differ between nvcc builds; keep the release line
        text = "".join(
            line for line in text.splitlines(keepends=True) if "Compiler Build ID" not in line
        )
        out.write_text(text)
        for arch in ("sm_75", "sm_90"):
            subprocess.run(
                ["ptxas", f"-arch={arch}", str(out), "-o", str(pathlib.Path(d) / "k.cubin")],
                check=True,
            )
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file")
    args = ap.parse_args()
    text = build()
    if args.check:
        if PTX.read_text() != text:
            print(f"{PTX} is stale: run python tools/build_rowcopy.py", file=sys.stderr)
            return 1
        return 0
    PTX.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
