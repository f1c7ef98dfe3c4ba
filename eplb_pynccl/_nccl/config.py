"""A version-safe mirror of ``ncclConfig_t``.

``ncclConfig_t`` is append-only: every NCCL release keeps the fields of the previous one in
the same order and adds new ones at the end. NCCL reads the struct through its
``size``/``magic``/``version`` header, so a struct laid out for exactly the loaded library's
version (its own prefix of :data:`CONFIG_FIELDS`, ``size`` = that prefix's ``sizeof``,
``version`` = the loaded library's version code) is what that library expects. Unset ints are
``INT_MIN`` and unset pointers ``NULL`` (NCCL's ``NCCL_CONFIG_UNDEF_*``).

The field list is checked against ``csrc_headers/eplb_nccl.h`` and the installed ``nccl.h`` by
``tests/test_header.py``, and the per-version sizes by ``make test-abi``.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

NCCL_API_MAGIC = 0xCAFEBEEF
UNDEF_INT = -(2**31)


class ConfigField(NamedTuple):
    c_name: str  # name in ncclConfig_t
    c_type: str  # "size_t", "unsigned int", "int" or "const char*"
    since: tuple[int, int, int]  # first NCCL version whose ncclConfig_t has it
    py_name: str | None  # keyword this package exposes, None for fields it leaves unset


# Order matters: this is the layout of ncclConfig_t. Versions from `make test-abi`.
CONFIG_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("size", "size_t", (2, 14, 0), None),
    ConfigField("magic", "unsigned int", (2, 14, 0), None),
    ConfigField("version", "unsigned int", (2, 14, 0), None),
    ConfigField("blocking", "int", (2, 14, 0), "blocking"),
    ConfigField("cgaClusterSize", "int", (2, 14, 0), "cga_cluster_size"),
    ConfigField("minCTAs", "int", (2, 14, 0), "min_ctas"),
    ConfigField("maxCTAs", "int", (2, 14, 0), "max_ctas"),
    ConfigField("netName", "const char*", (2, 14, 0), "net_name"),
    ConfigField("splitShare", "int", (2, 18, 0), "split_share"),
    ConfigField("trafficClass", "int", (2, 26, 0), None),
    ConfigField("commName", "const char*", (2, 27, 0), "comm_name"),
    ConfigField("collnetEnable", "int", (2, 27, 0), None),
    ConfigField("CTAPolicy", "int", (2, 27, 0), None),
    ConfigField("shrinkShare", "int", (2, 27, 0), None),
    ConfigField("nvlsCTAs", "int", (2, 27, 0), None),
    ConfigField("nChannelsPerNetPeer", "int", (2, 28, 0), None),
    ConfigField("nvlinkCentricSched", "int", (2, 28, 0), None),
    ConfigField("graphUsageMode", "int", (2, 29, 0), None),
    ConfigField("numRmaCtx", "int", (2, 29, 0), None),
    ConfigField("maxP2pPeers", "int", (2, 30, 0), None),
    ConfigField("graphStreamOrdering", "int", (2, 30, 5), None),
    ConfigField("launchOrderImplicit", "int", (2, 31, 0), None),
    ConfigField("numRmaSig", "int", (2, 31, 0), None),
    ConfigField("rmaEagerInit", "int", (2, 31, 0), None),
    ConfigField("hostCftMode", "int", (2, 31, 0), None),
    ConfigField("nvlsHostMode", "int", (2, 32, 0), None),
)

_C_TO_CTYPES = {
    "size_t": ctypes.c_size_t,
    "unsigned int": ctypes.c_uint,
    "int": ctypes.c_int,
    "const char*": ctypes.c_char_p,
}

# Keywords exposed to users -> ncclConfig_t field.
EXPOSED = {f.py_name: f for f in CONFIG_FIELDS if f.py_name}


def version_code(version: tuple[int, int, int]) -> int:
    """NCCL_VERSION(X, Y, Z) as nccl.h defines it (the encoding changed at 2.9)."""
    x, y, z = version
    if x <= 2 and y <= 8:
        return x * 1000 + y * 100 + z
    return x * 10000 + y * 100 + z


def fields_for(version: tuple[int, int, int]) -> tuple[ConfigField, ...]:
    """The ncclConfig_t fields a library of this version knows, in layout order."""
    return tuple(f for f in CONFIG_FIELDS if tuple(version) >= f.since)


_STRUCT_CACHE: dict[tuple[int, int, int], type] = {}


def struct_for(version: tuple[int, int, int]) -> type:
    """A ctypes Structure laid out as the given NCCL version's ncclConfig_t."""
    x, y, z = version  # a list from a caller is fine too
    key = (x, y, z)
    cls = _STRUCT_CACHE.get(key)
    if cls is None:
        fields = [(f.c_name, _C_TO_CTYPES[f.c_type]) for f in fields_for(key)]
        cls = type(f"ncclConfig_v{version_code(key)}", (ctypes.Structure,), {"_fields_": fields})
        _STRUCT_CACHE[key] = cls
    return cls


def config_size(version: tuple[int, int, int]) -> int:
    """sizeof(ncclConfig_t) as a library of this version defines it."""
    return ctypes.sizeof(struct_for(version))


def available_options(version: tuple[int, int, int]) -> frozenset[str]:
    """The keywords of :func:`build_config` a library of this version accepts."""
    return frozenset(f.py_name for f in fields_for(version) if f.py_name)


def build_config(version: tuple[int, int, int], **options: int | str | None) -> ctypes.Structure:
    """An ncclConfig_t for ``version`` with the given options set and every other field unset.

    ``options`` keys are the exposed names (blocking, cga_cluster_size, min_ctas, max_ctas,
    net_name, comm_name, split_share); ``None`` values mean unset. Setting an option the
    library is too old for raises ``ValueError`` naming the option and the version needed.
    Returns the struct; keep it (and its strings) alive until the NCCL call returns.
    """
    cls = struct_for(version)
    cfg = cls()
    keep = []
    for f in fields_for(version):
        if f.c_type == "int":
            setattr(cfg, f.c_name, UNDEF_INT)
    cfg.size = ctypes.sizeof(cls)
    cfg.magic = NCCL_API_MAGIC
    cfg.version = version_code(version)
    have = {f.py_name: f for f in fields_for(version) if f.py_name}
    for key, value in options.items():
        if value is None:
            continue
        if key not in EXPOSED:
            raise ValueError(
                f"unknown NCCL config option {key!r}; known: {', '.join(sorted(EXPOSED))}"
            )
        if key not in have:
            since = ".".join(map(str, EXPOSED[key].since))
            loaded = ".".join(map(str, version))
            raise ValueError(
                f"NCCL config option {key!r} needs NCCL >= {since}; the loaded library is {loaded}"
            )
        f = have[key]
        if f.c_type == "const char*":
            if not isinstance(value, str):
                raise TypeError(
                    f"NCCL config option {key!r} must be a str, got {type(value).__name__}"
                )
            raw = value.encode()
            keep.append(raw)
            setattr(cfg, f.c_name, raw)
        else:
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, int):
                raise TypeError(
                    f"NCCL config option {key!r} must be an int, got {type(value).__name__}"
                )
            if not (-(2**31) < value < 2**31):
                raise ValueError(f"NCCL config option {key!r}={value} does not fit a C int")
            setattr(cfg, f.c_name, value)
    cfg._keep = keep  # the encoded strings must outlive the struct
    return cfg
