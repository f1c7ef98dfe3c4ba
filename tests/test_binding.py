"""Layer 1 on the CPU: finding and loading libnccl, versions, UniqueId, ncclConfig_t, errors.

Everything runs against the real libnccl of the installed nvidia-nccl wheel (it loads without
a GPU). Discovery scenarios each run in a fresh interpreter, because a process loads libnccl
once. Without a GPU, ``ncclCommInitRank`` really fails (CUDA driver missing), which is how the
error mapping is exercised end to end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eplb_pynccl
from eplb_pynccl import (
    Communicator,
    CommunicatorStateError,
    EplbPyncclError,
    NcclError,
    NcclInternalError,
    NcclInvalidError,
    NcclLibraryError,
    NcclRemoteError,
    NcclSystemError,
    NcclTimeoutError,
    RearrangeError,
    UniqueId,
)
from eplb_pynccl._nccl import config, library, table
from eplb_pynccl.errors import error_class
from tests.gpu_util import libcuda_loadable

REPO = Path(__file__).resolve().parent.parent
ENV_VAR = "EPLB_PYNCCL_NCCL_SO"


# ---- helpers -----------------------------------------------------------------------------------


def _wheel_nccl() -> tuple[str, tuple[int, int, int], str] | None:
    """(distribution, version, resolved path of libnccl.so.2) of the installed nvidia-nccl
    wheel, from its own metadata (independent of the package's discovery code)."""
    for dist_name in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.name == "libnccl.so.2":
                path = Path(dist.locate_file(f)).resolve()
                if path.is_file():
                    m = re.match(r"(\d+)\.(\d+)\.(\d+)", dist.version)
                    assert m, f"cannot parse {dist_name} version {dist.version!r}"
                    return dist_name, tuple(int(x) for x in m.groups()), str(path)
    return None


WHEEL = _wheel_nccl()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason="no nvidia-nccl-cu12/cu13 wheel installed")


no_cuda_driver = pytest.mark.skipif(
    libcuda_loadable(),
    reason="a CUDA driver (libcuda.so.1) is present: ncclCommInitRank would not fail here",
)

PRELUDE = """
import json, os, sys
def out(**kw):
    print("RESULT " + json.dumps(kw))
def mapped_nccl():
    found = set()
    for line in open("/proc/self/maps"):
        parts = line.split(None, 5)
        if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libnccl"):
            found.add(parts[5].strip())
    return sorted(found)
def err(e):
    return {"type": type(e).__name__, "msg": str(e), "oserror": isinstance(e, OSError)}
def caught(res, key, call):
    try:
        call()
    except Exception as e:
        res[key] = err(e)
"""


def run_py(code: str, *, env: dict | None = None, flags: tuple = (), pythonpath: str | None = None):
    """Run ``code`` in a fresh interpreter; return the dict it passed to out()."""
    e = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    e["PYTHONPATH"] = str(REPO) if pythonpath is None else pythonpath
    e.update(env or {})
    proc = subprocess.run(
        [sys.executable, *flags, "-c", PRELUDE + textwrap.dedent(code)],
        env=e,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, f"no result line:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[0][len("RESULT ") :])


def _system_libnccl_loadable() -> bool:
    """Whether the dynamic loader (with this environment's LD_LIBRARY_PATH) finds a libnccl.so.2."""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", "import ctypes; ctypes.CDLL('libnccl.so.2')"],
        capture_output=True,
    )
    return proc.returncode == 0


def _mapped_libm() -> str:
    """The real path of the libm this interpreter has mapped (a real ELF that is not NCCL)."""
    for line in open("/proc/self/maps"):
        parts = line.split(None, 5)
        if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libm.so"):
            return parts[5].strip()
    name = ctypes.util.find_library("m")
    pytest.skip(f"libm is not mapped in this process (find_library: {name})")


# ---- discovery ---------------------------------------------------------------------------------


@needs_wheel
def test_default_discovery_picks_the_wheel_in_a_fresh_process():
    _, version, wheel_path = WHEEL
    r = run_py(
        """
        import eplb_pynccl
        from eplb_pynccl._nccl import library as L
        before = L.candidate_paths()
        mapped_before = mapped_nccl()
        path = eplb_pynccl.library_path()
        lib = L.loaded()
        out(before=before, mapped_before=mapped_before, path=path, source=lib.source,
            version=list(eplb_pynccl.nccl_version()), code=lib.version_code,
            after=L.candidate_paths(), missing=lib.missing, mapped_after=mapped_nccl())
        """
    )
    assert r["mapped_before"] == []
    sources = [s for s, _ in r["before"]]
    expected_order = ["nvidia.nccl wheel"]
    if importlib.util.find_spec("torch") is not None:
        expected_order.append("torch lib directory")
    expected_order.append("system loader")
    assert list(dict.fromkeys(sources)) == expected_order
    assert r["before"][-1] == ["system loader", "libnccl.so.2"]
    first_wheel = next(p for s, p in r["before"] if s == "nvidia.nccl wheel" and os.path.exists(p))
    assert os.path.realpath(first_wheel) == wheel_path
    torch_entries = [p for s, p in r["before"] if s == "torch lib directory"]
    assert [os.path.basename(p) for p in torch_entries] == ["libnccl.so.2", "libnccl.so"][
        : len(torch_entries)
    ]

    assert r["source"] == "nvidia.nccl wheel"
    assert os.path.realpath(r["path"]) == wheel_path
    assert tuple(r["version"]) == version
    assert r["code"] == config.version_code(version)
    assert r["missing"] == [], "the installed NCCL lacks functions of the binding's table"
    assert r["mapped_after"] == [wheel_path]
    assert r["after"][0] == ["already loaded in this process", wheel_path]


@needs_wheel
def test_env_var_path_is_used(tmp_path):
    _, version, wheel_path = WHEEL
    link = tmp_path / "libnccl-link.so.2"
    link.symlink_to(wheel_path)
    r = run_py(
        f"""
        import eplb_pynccl
        from eplb_pynccl._nccl import library as L
        p = eplb_pynccl.library_path()
        same = L.load({str(link)!r}) is L.loaded()
        out(path=p, source=L.loaded().source, version=list(eplb_pynccl.nccl_version()), same=same)
        """,
        env={ENV_VAR: wheel_path},
    )
    assert r == {
        "path": wheel_path,
        "source": f"${ENV_VAR}",
        "version": list(version),
        "same": True,
    }


@needs_wheel
def test_explicit_path_argument_is_used():
    _, _, wheel_path = WHEEL
    r = run_py(
        f"""
        from eplb_pynccl._nccl import library as L
        lib = L.load({wheel_path!r})
        out(path=lib.path, source=lib.source)
        """
    )
    assert r == {"path": wheel_path, "source": "explicit path"}


def test_env_var_nonexistent_path_is_an_error_without_fallback():
    r = run_py(
        """
        import eplb_pynccl
        from eplb_pynccl._nccl import library as L
        errors = []
        for call in (eplb_pynccl.library_path, eplb_pynccl.UniqueId.generate):
            try:
                call()
                errors.append(None)
            except Exception as e:
                errors.append(err(e))
        out(errors=errors, loaded=L.loaded() is not None, mapped=mapped_nccl())
        """,
        env={ENV_VAR: "/nonexistent/libnccl.so.2"},
    )
    expected = (
        "cannot load libnccl from /nonexistent/libnccl.so.2 ($EPLB_PYNCCL_NCCL_SO): "
        "/nonexistent/libnccl.so.2: cannot open shared object file: No such file or directory"
    )
    for e in r["errors"]:
        assert e == {"type": "NcclLibraryError", "msg": expected, "oserror": True}
    # No silent fallback to the wheel (which would load fine here).
    assert r["loaded"] is False
    assert r["mapped"] == []


def test_a_library_that_is_not_nccl_is_refused():
    soname = ctypes.util.find_library("m")
    assert soname, "find_library('m') found nothing"
    full = _mapped_libm()
    r = run_py(
        f"""
        import eplb_pynccl
        from eplb_pynccl._nccl import library as L
        res = {{}}
        caught(res, "env", eplb_pynccl.library_path)
        caught(res, "explicit", lambda: L.load({full!r}))
        out(res=res, loaded=L.loaded() is not None)
        """,
        env={ENV_VAR: soname},
    )
    assert r["res"] == {
        "env": {
            "type": "NcclLibraryError",
            "msg": f"{soname} has no ncclGetVersion: not a NCCL library",
            "oserror": True,
        },
        "explicit": {
            "type": "NcclLibraryError",
            "msg": f"{full} has no ncclGetVersion: not a NCCL library",
            "oserror": True,
        },
    }
    assert r["loaded"] is False


def test_when_every_candidate_fails_the_error_lists_each_tried_path(tmp_path):
    if _system_libnccl_loadable():
        pytest.skip("the system loader finds a libnccl.so.2 here, so discovery cannot fail")
    # A fake site directory: an nvidia.nccl "wheel" whose libnccl.so.2 is really libm, and a
    # torch whose lib/libnccl.so.2 is an empty file and which has no lib/libnccl.so.
    site = tmp_path / "site"
    wheel_lib = site / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    wheel_lib.parent.mkdir(parents=True)
    shutil.copyfile(_mapped_libm(), wheel_lib)
    torch_lib = site / "torch" / "lib"
    torch_lib.mkdir(parents=True)
    (torch_lib / "libnccl.so.2").write_bytes(b"")
    r = run_py(
        f"""
        sys.path[:0] = [{str(REPO)!r}, {str(site)!r}]
        import eplb_pynccl
        from eplb_pynccl._nccl import library as L
        cands = L.candidate_paths()
        try:
            eplb_pynccl.library_path()
            res = None
        except Exception as e:
            res = err(e)
        out(cands=cands, res=res, torch="torch" in sys.modules, loaded=L.loaded() is not None)
        """,
        flags=("-S",),  # no site-packages: the real nvidia wheel and torch are invisible
        pythonpath="",
    )
    w, t2, t1 = str(wheel_lib), str(torch_lib / "libnccl.so.2"), str(torch_lib / "libnccl.so")
    assert r["cands"] == [
        ["nvidia.nccl wheel", w],
        ["torch lib directory", t2],
        ["torch lib directory", t1],
        ["system loader", "libnccl.so.2"],
    ]
    assert r["torch"] is False and r["loaded"] is False
    assert r["res"]["type"] == "NcclLibraryError"
    lines = r["res"]["msg"].split("\n")
    assert lines[0] == "libnccl not found. Tried, in order:"
    assert lines[1] == f"  {w} (nvidia.nccl wheel): {w} has no ncclGetVersion: not a NCCL library"
    assert re.fullmatch(
        rf"  {re.escape(t2)} \(torch lib directory\): .*{re.escape(t2)}: file too short", lines[2]
    )
    assert lines[3] == f"  {t1} (torch lib directory): no such file"
    assert (
        lines[4]
        == "  libnccl.so.2 (system loader): libnccl.so.2: cannot open shared object file: No such file or directory"
    )
    assert (
        lines[5] == f"Install nvidia-nccl-cu12 (or -cu13), or set {ENV_VAR} to the library's path."
    )
    assert len(lines) == 6


@needs_wheel
def test_already_loaded_library_wins_and_cannot_be_switched(tmp_path):
    _, _, wheel_path = WHEEL
    link = tmp_path / "same-libnccl.so.2"
    link.symlink_to(wheel_path)
    other = "/nonexistent/other/libnccl.so.2"
    r = run_py(
        f"""
        import ctypes
        ctypes.CDLL({wheel_path!r})            # as torch would, before eplb_pynccl looks
        import eplb_pynccl
        from eplb_pynccl._nccl import library as L
        cands = L.candidate_paths()
        lib = L.load()
        res = {{"cands0": cands[0], "source": lib.source, "path": lib.path}}
        caught(res, "explicit", lambda: L.load({other!r}))
        os.environ["EPLB_PYNCCL_NCCL_SO"] = {other!r}
        caught(res, "env", eplb_pynccl.library_path)
        os.environ["EPLB_PYNCCL_NCCL_SO"] = {str(link)!r}   # the same file: accepted
        res["same_file"] = eplb_pynccl.library_path()
        res["mapped"] = mapped_nccl()
        out(**res)
        """
    )
    assert r["cands0"] == ["already loaded in this process", wheel_path]
    assert r["source"] == "already loaded in this process"
    assert r["path"] == wheel_path
    head = f"libnccl is already loaded from {wheel_path} (already loaded in this process); cannot switch to {other}"
    assert r["explicit"] == {
        "type": "NcclLibraryError",
        "msg": f"{head} (explicit path) in the same process",
        "oserror": True,
    }
    assert r["env"] == {
        "type": "NcclLibraryError",
        "msg": f"{head} ($EPLB_PYNCCL_NCCL_SO) in the same process",
        "oserror": True,
    }
    assert r["same_file"] == wheel_path
    assert r["mapped"] == [wheel_path]


@needs_wheel
def test_too_old_library_is_refused():
    # The version check runs on the real library; MIN_VERSION is raised above it (make test-abi
    # loads real old wheels).
    _, version, wheel_path = WHEEL
    r = run_py(
        f"""
        from eplb_pynccl._nccl import library as L
        L.MIN_VERSION = (99, 0, 0)
        res = {{}}
        caught(res, "discovery", L.load)
        caught(res, "explicit", lambda: L.load({wheel_path!r}))
        out(loaded=L.loaded() is not None, **res)
        """
    )
    v = ".".join(map(str, version))
    too_old = (
        f"NCCL {v} at {wheel_path} is too old: eplb_pynccl needs NCCL >= 99.0.0 "
        "(install nvidia-nccl-cu12 or -cu13)"
    )
    assert r["explicit"] == {"type": "NcclLibraryError", "msg": too_old, "oserror": True}
    msg = r["discovery"]["msg"]
    assert msg.startswith("libnccl not found. Tried, in order:\n")
    assert f"  {wheel_path} (nvidia.nccl wheel): {too_old}\n" in msg
    assert r["loaded"] is False


def test_candidate_paths_in_process_are_in_discovery_order():
    rank = {
        "already loaded in this process": 0,
        "nvidia.nccl wheel": 1,
        "torch lib directory": 2,
        "system loader": 3,
    }
    cands = library.candidate_paths()
    assert cands, "no candidates at all"
    order = [rank[s] for s, _ in cands]  # KeyError on an unknown source
    assert order == sorted(order)
    assert cands[-1] == ("system loader", "libnccl.so.2")
    # Once loaded, the loaded file is the first candidate.
    lib = library.load()
    assert library.candidate_paths()[0] == (
        "already loaded in this process",
        os.path.realpath(lib.path),
    )


@pytest.mark.parametrize(
    "code, expected",
    [
        (22803, (2, 28, 3)),
        (21903, (2, 19, 3)),
        (23203, (2, 32, 3)),
        (20906, (2, 9, 6)),
        (30001, (3, 0, 1)),
        (2708, (2, 7, 8)),  # before 2.9: X*1000 + Y*100 + Z
        (2408, (2, 4, 8)),
        (2800, (2, 8, 0)),
    ],
)
def test_decode_version_both_encodings(code, expected):
    assert library.decode_version(code) == expected
    assert config.version_code(expected) == code


@needs_wheel
def test_nccl_version_is_the_installed_wheels():
    dist, version, _ = WHEEL
    assert eplb_pynccl.nccl_version() == version, f"{dist} is {version}"
    lib = library.load()
    assert lib.version == version
    assert library.decode_version(lib.version_code) == version
    assert library.MIN_VERSION <= lib.version


def test_library_function_lookup():
    lib = library.load()
    assert lib.missing == []
    for f in table.FUNCTIONS:
        assert lib.has(f.name)
    assert not lib.has("ncclNoSuchFunction")
    v = ".".join(map(str, lib.version))
    with pytest.raises(
        NcclLibraryError,
        match=re.escape(f"ncclNoSuchFunction is not exported by {lib.path} (NCCL {v})"),
    ):
        lib.fn("ncclNoSuchFunction")


# ---- UniqueId ----------------------------------------------------------------------------------


def test_unique_id_generate():
    a, b = UniqueId.generate(), UniqueId.generate()
    assert len(bytes(a)) == 128 and isinstance(bytes(a), bytes)
    assert a != b and bytes(a) != bytes(b)
    assert any(bytes(a))
    assert repr(a) == f"UniqueId({bytes(a)[:8].hex()}...)"


def test_unique_id_round_trips_and_equality():
    raw = bytes(range(128))
    u = UniqueId(raw)
    assert bytes(u) == raw
    assert UniqueId.from_bytes(raw) == u
    assert UniqueId(bytearray(raw)) == u
    assert UniqueId(memoryview(raw)) == u
    assert u.hex() == raw.hex()
    assert UniqueId.from_hex(u.hex()) == u
    assert UniqueId.from_hex(u.hex().upper()) == u
    assert hash(UniqueId(raw)) == hash(u)
    assert len({u, UniqueId(raw), UniqueId(bytes(128))}) == 2
    assert u != raw  # not equal to its bytes
    assert u != UniqueId(raw[:-1] + b"\x00")
    g = UniqueId.generate()
    assert UniqueId.from_hex(g.hex()) == g and UniqueId.from_bytes(bytes(g)) == g
    assert pickle.loads(pickle.dumps(bytes(g))) == bytes(g)


@pytest.mark.parametrize(
    "make, exc, msg",
    [
        (lambda: UniqueId("a" * 128), TypeError, "unique id must be bytes, got str"),
        (lambda: UniqueId(None), TypeError, "unique id must be bytes, got NoneType"),
        (lambda: UniqueId(list(range(128))), TypeError, "unique id must be bytes, got list"),
        (lambda: UniqueId(b""), ValueError, "unique id must be 128 bytes, got 0"),
        (lambda: UniqueId(bytes(127)), ValueError, "unique id must be 128 bytes, got 127"),
        (
            lambda: UniqueId.from_bytes(bytes(129)),
            ValueError,
            "unique id must be 128 bytes, got 129",
        ),
        (lambda: UniqueId.from_hex("00" * 127), ValueError, "unique id must be 128 bytes, got 127"),
        (lambda: UniqueId.from_hex("zz" * 128), ValueError, "unique id hex is not valid hex: "),
        (lambda: UniqueId.from_hex(None), ValueError, "unique id hex is not valid hex: "),
    ],
)
def test_unique_id_errors(make, exc, msg):
    with pytest.raises(exc, match="^" + re.escape(msg)):
        make()


# ---- ncclConfig_t ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, size",
    [
        ((2, 19, 0), 48),
        ((2, 19, 3), 48),
        ((2, 27, 0), 72),
        ((2, 28, 0), 80),
        ((2, 29, 0), 88),
        ((2, 30, 5), 96),
    ],
)
def test_config_size_per_version(version, size):
    assert config.config_size(version) == size
    cls = config.struct_for(version)
    assert ctypes.sizeof(cls) == size
    assert config.struct_for(version) is cls  # cached
    names = [n for n, _ in cls._fields_]
    assert names == [f.c_name for f in config.CONFIG_FIELDS][: len(names)]
    assert names == [f.c_name for f in config.fields_for(version)]


@pytest.mark.parametrize("version", [(2, 19, 0), (2, 27, 0), (2, 28, 0), (2, 30, 5)])
def test_config_unset_fields_and_header(version):
    cfg = config.build_config(version)
    fields = config.fields_for(version)
    assert cfg.size == config.config_size(version)
    assert cfg.magic == 0xCAFEBEEF
    assert cfg.version == version[0] * 10000 + version[1] * 100 + version[2]
    ints = [f.c_name for f in fields if f.c_type == "int"]
    ptrs = [f.c_name for f in fields if f.c_type == "const char*"]
    assert "blocking" in ints and "netName" in ptrs
    for name in ints:
        assert getattr(cfg, name) == -(2**31), name
    for name in ptrs:
        assert getattr(cfg, name) is None, name
    # and through the raw bytes: every unset int is INT_MIN, every pointer NULL
    raw = ctypes.string_at(ctypes.addressof(cfg), ctypes.sizeof(cfg))
    cls = type(cfg)
    for name in ints:
        off = getattr(cls, name).offset
        assert raw[off : off + 4] == (-(2**31)).to_bytes(4, "little", signed=True)
    for name in ptrs:
        off = getattr(cls, name).offset
        assert raw[off : off + 8] == bytes(8)


def test_config_options_set():
    v = (2, 28, 0)
    cfg = config.build_config(
        v,
        blocking=0,
        min_ctas=2,
        max_ctas=16,
        cga_cluster_size=4,
        net_name="IB",
        comm_name="experts",
        split_share=True,
    )
    assert (cfg.blocking, cfg.minCTAs, cfg.maxCTAs, cfg.cgaClusterSize, cfg.splitShare) == (
        0,
        2,
        16,
        4,
        1,
    )
    assert cfg.netName == b"IB" and cfg.commName == b"experts"
    for name in (
        "trafficClass",
        "collnetEnable",
        "CTAPolicy",
        "shrinkShare",
        "nvlsCTAs",
        "nChannelsPerNetPeer",
        "nvlinkCentricSched",
    ):
        assert getattr(cfg, name) == -(2**31), name
    # None means unset
    cfg2 = config.build_config(v, max_ctas=None, comm_name=None)
    assert cfg2.maxCTAs == -(2**31) and cfg2.commName is None
    assert config.available_options((2, 19, 0)) == {
        "blocking",
        "cga_cluster_size",
        "min_ctas",
        "max_ctas",
        "net_name",
        "split_share",
    }
    assert config.available_options((2, 27, 0)) == config.available_options((2, 19, 0)) | {
        "comm_name"
    }


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (
            {"comm_name": "x"},
            ValueError,
            "NCCL config option 'comm_name' needs NCCL >= 2.27.0; the loaded library is 2.19.0",
        ),
        (
            {"bogus": 1},
            ValueError,
            "unknown NCCL config option 'bogus'; known: blocking, cga_cluster_size, comm_name, "
            "max_ctas, min_ctas, net_name, split_share",
        ),
        ({"net_name": 5}, TypeError, "NCCL config option 'net_name' must be a str, got int"),
        ({"net_name": b"IB"}, TypeError, "NCCL config option 'net_name' must be a str, got bytes"),
        ({"max_ctas": "4"}, TypeError, "NCCL config option 'max_ctas' must be an int, got str"),
        ({"min_ctas": 1.5}, TypeError, "NCCL config option 'min_ctas' must be an int, got float"),
        (
            {"max_ctas": 2**31},
            ValueError,
            "NCCL config option 'max_ctas'=2147483648 does not fit a C int",
        ),
        (
            {"blocking": -(2**31)},
            ValueError,
            "NCCL config option 'blocking'=-2147483648 does not fit a C int",
        ),
    ],
)
def test_config_option_errors(kwargs, exc, msg):
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        config.build_config((2, 19, 0), **kwargs)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, cls",
    [
        (0, NcclError),
        (1, NcclSystemError),
        (2, NcclSystemError),
        (3, NcclInternalError),
        (4, NcclInvalidError),
        (5, NcclInvalidError),
        (6, NcclRemoteError),
        (7, NcclError),
        (8, NcclTimeoutError),
        (99, NcclError),
    ],
)
def test_error_class_mapping(code, cls):
    assert error_class(code) is cls
    lib = library.load()
    e = lib.error(code, "ncclSomething")
    assert type(e) is cls
    assert e.code == code and e.function == "ncclSomething"
    assert e.name == {r.value: r.name for r in table.Result}.get(code, f"ncclResult({code})")
    assert e.error_string == lib.error_string(code)
    assert str(e).startswith(f"ncclSomething failed: {e.name} ({code})")


def test_error_names_match_the_table_and_nccl_strings():
    assert [r.value for r in table.Result] == list(range(9))
    lib = library.load()
    for code in range(1, 9):
        assert lib.error_string(code), code
    assert lib.check(0, "x") == 0
    assert lib.check(7, "x") == 7  # in progress is not an error
    with pytest.raises(NcclInvalidError, match=r"^ncclFoo failed: ncclInvalidUsage \(5\): "):
        lib.check(5, "ncclFoo")


def test_error_hierarchy():
    assert issubclass(NcclInvalidError, ValueError)
    assert issubclass(NcclTimeoutError, TimeoutError)
    assert issubclass(NcclLibraryError, OSError)
    assert issubclass(CommunicatorStateError, RuntimeError)
    assert issubclass(RearrangeError, RuntimeError)
    for cls in (NcclError, NcclLibraryError, CommunicatorStateError, RearrangeError):
        assert issubclass(cls, EplbPyncclError)
    for cls in (
        NcclSystemError,
        NcclInternalError,
        NcclInvalidError,
        NcclRemoteError,
        NcclTimeoutError,
    ):
        assert issubclass(cls, NcclError)


def test_error_message_format():
    e = NcclRemoteError(6, "remote process exited", "peer 3 died", "ncclGroupEnd", "layer 7")
    assert str(e) == (
        "ncclGroupEnd failed: ncclRemoteError (6): remote process exited; "
        "NCCL last error: peer 3 died; layer 7"
    )
    assert str(NcclError(42)) == "ncclResult(42) (42)"
    assert NcclError(42).name == "ncclResult(42)"


@pytest.mark.parametrize(
    "cls",
    [
        NcclError,
        NcclSystemError,
        NcclInternalError,
        NcclInvalidError,
        NcclRemoteError,
        NcclTimeoutError,
    ],
)
def test_nccl_error_pickles(cls):
    e = cls(
        8 if cls is NcclTimeoutError else 4, "some string", "last words", "ncclSend", "detail text"
    )
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is cls
    for attr in ("code", "name", "error_string", "last_error", "function", "detail"):
        assert getattr(e2, attr) == getattr(e, attr), attr
    assert str(e2) == str(e)


def test_rearrange_error_pickles():
    cause = ValueError("x")
    e = RearrangeError(
        "shuffle failed", completed_layers=[3, 1], pending_layers={2}, peers=(5, 0), cause=cause
    )
    assert e.completed_layers == [1, 3] and e.pending_layers == [2] and e.peers == [0, 5]
    assert e.cause is cause
    assert (
        str(e)
        == "shuffle failed (layers complete: [1, 3]; layers still old: [2]; peers involved: [0, 5])"
    )
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is RearrangeError
    assert (e2.message, e2.completed_layers, e2.pending_layers, e2.peers) == (
        "shuffle failed",
        [1, 3],
        [2],
        [0, 5],
    )
    assert str(e2) == str(e)
    assert e2.cause is None  # the cause is not carried across processes


# ---- the real ncclCommInitRank failing without a GPU ------------------------------------------


INIT_CASES = [
    ({}, "ncclCommInitRank"),
    ({"blocking": False}, "ncclCommInitRankConfig"),
    ({"max_ctas": 4, "min_ctas": 1, "comm_name": "t"}, "ncclCommInitRankConfig"),
    (
        {"blocking": False, "timeout": 5, "split_share": True, "net_name": "Socket"},
        "ncclCommInitRankConfig",
    ),
]


@no_cuda_driver
@pytest.mark.parametrize("kwargs, function", INIT_CASES)
def test_comm_init_without_gpu_maps_the_real_error(kwargs, function):
    with pytest.raises(NcclSystemError) as info:
        Communicator(UniqueId.generate(), 0, 1, **kwargs)
    e = info.value
    assert isinstance(e, NcclError) and not isinstance(e, NcclInvalidError)
    assert e.code == 1
    assert e.name == "ncclUnhandledCudaError"
    assert e.function == function
    assert e.error_string
    assert e.error_string == library.load().error_string(1)
    assert "CUDA driver version is insufficient" in e.last_error
    # NCCL's own words read as a version problem: the error says there is no GPU
    from eplb_pynccl._nccl import cuda

    assert e.detail == (
        "no usable GPU on this machine: the CUDA driver does not load "
        f"({cuda.unavailable_reason()}); a Communicator needs an NVIDIA GPU and its driver"
    )
    assert str(e) == (
        f"{function} failed: ncclUnhandledCudaError (1): {e.error_string}; NCCL last error: "
        f"{e.last_error}; {e.detail}"
    )
    # The failed init must not leave this thread inside an NCCL group (later groups would then
    # never launch): a bare ncclGroupEnd has to be refused as "not in a group call".
    with pytest.raises(NcclInvalidError, match=r"ncclGroupEnd: not in a group call"):
        library.load().group_end()
    # and the library is still usable afterwards
    assert len(bytes(UniqueId.generate())) == 128


@no_cuda_driver
def test_comm_init_error_pickles_from_a_real_failure():
    with pytest.raises(NcclSystemError) as info:
        Communicator(UniqueId.generate(), 0, 1)
    e2 = pickle.loads(pickle.dumps(info.value))
    assert type(e2) is NcclSystemError
    assert (e2.code, e2.last_error, str(e2)) == (1, info.value.last_error, str(info.value))


# ---- importing needs neither torch, cupy nor libnccl -------------------------------------------


def test_import_loads_neither_torch_nor_cupy_nor_libnccl():
    r = run_py(
        """
        import eplb_pynccl
        from eplb_pynccl import Communicator, UniqueId, group
        from eplb_pynccl._nccl import library as L
        with group():
            pass
        out(mods=[m for m in ("torch", "cupy", "numpy") if m in sys.modules],
            loaded=L.loaded() is not None, mapped=mapped_nccl())
        """
    )
    assert r["mods"] in ([], ["numpy"])
    assert "torch" not in r["mods"] and "cupy" not in r["mods"]
    assert r["loaded"] is False and r["mapped"] == []


def test_import_works_where_torch_and_cupy_are_not_installed():
    r = run_py(
        f"""
        sys.path.insert(0, {str(REPO)!r})
        import importlib.util
        visible = [m for m in ("torch", "cupy", "nvidia") if importlib.util.find_spec(m)]
        import eplb_pynccl
        out(visible=visible, mods=[m for m in ("torch", "cupy") if m in sys.modules],
            names=sorted(n for n in ("Communicator", "UniqueId", "group", "NcclError") if hasattr(eplb_pynccl, n)))
        """,
        flags=("-S",),
        pythonpath="",
    )
    assert r == {
        "visible": [],
        "mods": [],
        "names": ["Communicator", "NcclError", "UniqueId", "group"],
    }


def test_load_library_public_entry_point():
    """eplb_pynccl.load_library: an explicit path loads and is reported; a bad one is named."""
    import subprocess
    import sys

    code = (
        "import eplb_pynccl as ep, sys\n"
        "try:\n"
        "    ep.load_library('/nonexistent/libnccl.so.2')\n"
        "except ep.NcclLibraryError as e:\n"
        "    print('ERR', e)\n"
        "p = ep._nccl.library.candidate_paths()\n"
        "wheel = [x for s, x in p if s == 'nvidia.nccl wheel'][0]\n"
        "print('PATH', ep.load_library(wheel) == wheel == ep.library_path())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERR cannot load libnccl from /nonexistent/libnccl.so.2 (explicit path)" in out.stdout
    assert "PATH True" in out.stdout


# ---- the hot path's call arguments ---------------------------------------------------------


def _libc_fn(name, restype):
    fn = ctypes.CDLL(None)[name]
    fn.restype = restype
    return fn


def test_hot_path_words_are_taken_on_lp64_linux():
    # x86-64 and aarch64 Linux pass a pointer and a size_t alike: the fast arguments must be on
    # (the fallback, plain ctypes objects, is for ABIs where the load-time check fails)
    assert library.WORDS_BY_REF is True
    assert library.INT_ARG_MAX == 2**31 - 1


@pytest.mark.parametrize(
    "value", [0, 1, 4096, 2**31 - 1, 2**31, 2**32 + 7, 2**46 + 12345, 2**63 - 1]
)
def test_word_and_size_arg_reach_c_as_the_exact_64_bit_value(value):
    labs = _libc_fn("labs", ctypes.c_long)  # long labs(long) returns its non-negative argument
    assert labs(library.word(value)) == value
    assert labs(library.size_arg(value)) == value


def test_word_passes_a_real_pointer_and_size_arg_a_byte_count():
    memmove = _libc_fn("memmove", ctypes.c_void_p)
    src = ctypes.create_string_buffer(bytes(range(1, 65)), 64)
    dst = ctypes.create_string_buffer(64)
    d = ctypes.addressof(dst)
    r = memmove(library.word(d + 3), library.word(ctypes.addressof(src)), library.size_arg(40))
    assert r == d + 3
    assert dst.raw == b"\0" * 3 + bytes(range(1, 41)) + b"\0" * 21
