"""Layer 1: the NCCL binding. The only package in eplb_pynccl that touches ctypes."""

from . import config, cuda, table
from .library import (
    ENV_VAR,
    MIN_VERSION,
    NcclLibrary,
    candidate_paths,
    decode_version,
    load,
    loaded,
)

__all__ = [
    "ENV_VAR",
    "MIN_VERSION",
    "NcclLibrary",
    "candidate_paths",
    "config",
    "cuda",
    "decode_version",
    "load",
    "loaded",
    "table",
]
