"""csrc_headers/eplb_nccl.h against the binding's tables and against the installed nccl.h.

Three sources must say the same thing about the NCCL ABI this package uses:

* ``eplb_pynccl/_nccl/table.py`` (its functions and enums) and ``config.py`` (what the binding does);
* ``csrc_headers/eplb_nccl.h`` (this project's declaration of it);
* the ``nccl.h`` of the installed nvidia-nccl wheel (what NCCL declares).

The mutation tests feed altered header texts and check the exact disagreement reported, so a
checker that silently passes everything would be caught.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from eplb_pynccl._nccl import config, table
from eplb_pynccl.errors import NcclError
from tests import header_parse as hp

REPO = Path(__file__).resolve().parent.parent
OUR_HEADER = REPO / "csrc_headers" / "eplb_nccl.h"


@pytest.fixture(scope="module")
def ours() -> str:
    return OUR_HEADER.read_text()


def _installed_header() -> Path | None:
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = Path(d) / "nccl" / "include" / "nccl.h"
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="module")
def installed() -> tuple[str, tuple[int, int, int]]:
    path = _installed_header()
    if path is None:
        pytest.skip("no nvidia-nccl wheel with include/nccl.h is installed")
    text = path.read_text(errors="replace")
    version = hp.header_version(text)
    assert version is not None, f"{path} has no NCCL_MAJOR/MINOR/PATCH"
    return text, version


def mutate(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"mutation target {old!r} found {text.count(old)} times"
    return text.replace(old, new)


def table_vs(header_text: str) -> list[str]:
    return hp.project_disagreements(header_text)


def installed_vs(header_text: str, installed) -> list[str]:
    text, version = installed
    return hp.compare_header_to_installed(header_text, text, version)


# -- the real files agree ---------------------------------------------------------------------


def test_table_agrees_with_our_header(ours):
    assert table_vs(ours) == []


def test_our_header_declares_exactly_the_table(ours):
    parsed = hp.parse_ours(ours)
    assert set(parsed.prototypes) == {f.name for f in table.FUNCTIONS}
    assert [n for n, _ in parsed.config] == [f.c_name for f in config.CONFIG_FIELDS]
    # every config field carries a since annotation
    assert all(n in parsed.since for n, _ in parsed.config)
    assert parsed.enums["ncclResult_t"]["ncclNumResults"] == len(table.Result)


def test_every_result_names_its_exception_class():
    for r in table.Result:
        assert issubclass(r.exception, NcclError), r


def test_our_header_agrees_with_installed_nccl_h(ours, installed):
    assert installed_vs(ours, installed) == []


def test_config_size_matches_installed_struct(installed):
    text, version = installed
    fields = hp.parse_struct(text, "ncclConfig_t")
    assert fields, "installed nccl.h has no ncclConfig_t"
    assert config.config_size(version) == hp.c_struct_size(fields)
    # and the field names of the ctypes struct are the installed ones, in order
    assert [f[0] for f in config.struct_for(version)._fields_] == [n for n, _ in fields]


def test_installed_struct_is_versioned(installed):
    text, _ = installed
    tag, _ = hp.parse_structs(text)["ncclConfig_t"]
    assert tag is not None and tag.startswith("ncclConfig_v")


# -- the checks can fail ----------------------------------------------------------------------


def test_changed_enum_value_is_reported(ours, installed):
    bad = mutate(ours, "ncclInvalidUsage       = 5,", "ncclInvalidUsage       = 15,")
    assert table_vs(bad) == [
        "enum ncclResult_t: ncclInvalidUsage = 5 in table.py, 15 in eplb_nccl.h",
    ]
    v = hp.vstr(installed[1])
    assert installed_vs(bad, installed) == [
        f"enum ncclResult_t: ncclInvalidUsage = 15 in eplb_nccl.h, 5 in nccl.h {v}"
    ]


def test_changed_datatype_in_installed_header_is_reported(ours, installed):
    text, version = installed
    bad = mutate(text, "ncclBfloat16   = 9,", "ncclBfloat16   = 13,")
    assert hp.compare_header_to_installed(ours, bad, version) == [
        f"enum ncclDataType_t: ncclBfloat16 = 9 in eplb_nccl.h, 13 in nccl.h {hp.vstr(version)}"
    ]


def test_swapped_config_fields_are_reported(ours, installed):
    bad = mutate(
        ours,
        "int collnetEnable;            /* since 2.27.0 */\n  int CTAPolicy;                /* since 2.27.0 */",
        "int CTAPolicy;                /* since 2.27.0 */\n  int collnetEnable;            /* since 2.27.0 */",
    )
    assert table_vs(bad) == [
        "ncclConfig_t field 12: 'collnetEnable' (int) in config.py, 'CTAPolicy' (int) in eplb_nccl.h",
        "ncclConfig_t field 13: 'CTAPolicy' (int) in config.py, 'collnetEnable' (int) in eplb_nccl.h",
    ]
    v = hp.vstr(installed[1])
    assert installed_vs(bad, installed) == [
        f"ncclConfig_t field 12: 'CTAPolicy' (int) in eplb_nccl.h, 'collnetEnable' (int) in nccl.h {v}",
        f"ncclConfig_t field 13: 'collnetEnable' (int) in eplb_nccl.h, 'CTAPolicy' (int) in nccl.h {v}",
    ]


def test_changed_config_field_type_is_reported(ours):
    bad = mutate(ours, "const char* commName;", "int commName;")
    assert table_vs(bad) == [
        "ncclConfig_t field 11: 'commName' (const char*) in config.py, 'commName' (int) in eplb_nccl.h"
    ]


def test_changed_argument_type_is_reported(ours, installed):
    bad = mutate(
        ours,
        "ncclResult_t ncclSend(const void* sendbuff, size_t count,",
        "ncclResult_t ncclSend(const void* sendbuff, int count,",
    )
    assert table_vs(bad) == [
        "function ncclSend: argument 2 type 'size_t' in table.py, 'int' in eplb_nccl.h"
    ]
    v = hp.vstr(installed[1])
    assert installed_vs(bad, installed) == [
        f"function ncclSend: argument 2 type 'int' in eplb_nccl.h, 'size_t' in nccl.h {v}"
    ]


def test_changed_return_type_and_arity_are_reported(ours):
    bad = mutate(
        ours,
        "const char* ncclGetLastError(ncclComm_t comm);",
        "char* ncclGetLastError(ncclComm_t comm);",
    )
    bad = mutate(
        bad,
        "ncclResult_t ncclMemFree(void* ptr);",
        "ncclResult_t ncclMemFree(void* ptr, int flags);",
    )
    assert table_vs(bad) == [
        "function ncclGetLastError: return type 'const char*' in table.py, 'char*' in eplb_nccl.h",
        "function ncclMemFree: 1 arguments in table.py, 2 in eplb_nccl.h",
    ]


def test_missing_function_is_reported(ours, installed):
    bad = mutate(ours, "ncclResult_t ncclMemFree(void* ptr);\n", "")
    assert table_vs(bad) == ["function ncclMemFree: in table.py but not in eplb_nccl.h"]
    text, version = installed
    gone = text.replace("ncclResult_t  ncclMemFree(void *ptr);", "")
    assert gone != text
    assert hp.compare_header_to_installed(ours, gone, version) == [
        f"function ncclMemFree: in eplb_nccl.h but not in nccl.h {hp.vstr(version)}"
    ]


def test_extra_function_is_reported(ours):
    bad = mutate(
        ours,
        "ncclResult_t ncclMemFree(void* ptr);",
        "ncclResult_t ncclMemFree(void* ptr);\nncclResult_t ncclCommRevoke(ncclComm_t comm, int flags);",
    )
    assert table_vs(bad) == ["function ncclCommRevoke: in eplb_nccl.h but not in table.py"]


def test_since_disagreements_are_reported(ours):
    bad = mutate(
        ours, "ncclFloat8e4m3 = 10, /* since 2.24.0 */", "ncclFloat8e4m3 = 10, /* since 2.25.0 */"
    )
    bad = mutate(
        bad,
        "int nvlsHostMode;             /* since 2.32.0 */",
        "int nvlsHostMode;             /* since 2.33.0 */",
    )
    assert table_vs(bad) == [
        "since ncclFloat8e4m3: 2.24.0 in table.Dtype.since, 2.25.0 in eplb_nccl.h",
        "ncclConfig_t field nvlsHostMode: since 2.32.0 in config.py, 2.33.0 in eplb_nccl.h",
    ]


def test_since_gates_the_installed_comparison(ours, installed):
    text, version = installed
    last = config.CONFIG_FIELDS[-1]
    assert tuple(version) >= last.since
    older = mutate(text, f"  int {last.c_name};\n", "")
    n = len(config.CONFIG_FIELDS)
    before = (last.since[0], last.since[1] - 1, 99)
    # the text without the newest field, read as a release before that field: agrees
    assert hp.compare_header_to_installed(ours, older, before) == []
    # ... read as the release that introduced it: the missing field is reported
    assert hp.compare_header_to_installed(ours, older, last.since) == [
        f"ncclConfig_t: {n} fields in eplb_nccl.h, {n - 1} in nccl.h {hp.vstr(last.since)} "
        f"(only in eplb_nccl.h: {last.c_name})"
    ]
    # and an older release that already has a field our header dates later is reported too
    assert hp.compare_header_to_installed(ours, text, before) == [
        f"ncclConfig_t: {n - 1} fields in eplb_nccl.h, {n} in nccl.h {hp.vstr(before)} "
        f"(only in nccl.h {hp.vstr(before)}: {last.c_name})"
    ]


def _enum_messages(msgs: list[str], enum: str) -> list[str]:
    return [m for m in msgs if m.startswith(f"enum {enum}:")]


def test_datatype_added_later_is_expected_missing(ours, installed):
    text, _ = installed
    old = mutate(text, "ncclFloat8e4m3 = 10,", "")
    old = mutate(old, "ncclFloat8e5m2 = 11,", "")
    dt = "ncclDataType_t"
    assert _enum_messages(hp.compare_header_to_installed(ours, old, (2, 23, 4)), dt) == []
    assert _enum_messages(hp.compare_header_to_installed(ours, text, (2, 23, 4)), dt) == [
        "enum ncclDataType_t: ncclFloat8e4m3 in nccl.h 2.23.4 although eplb_nccl.h says since 2.24.0",
        "enum ncclDataType_t: ncclFloat8e5m2 in nccl.h 2.23.4 although eplb_nccl.h says since 2.24.0",
    ]
    assert _enum_messages(hp.compare_header_to_installed(ours, old, (2, 24, 0)), dt) == [
        "enum ncclDataType_t: ncclFloat8e4m3 in eplb_nccl.h but not in nccl.h 2.24.0",
        "enum ncclDataType_t: ncclFloat8e5m2 in eplb_nccl.h but not in nccl.h 2.24.0",
    ]


def test_count_sentinel_compared_only_when_all_members_are_due(ours, installed):
    text, version = installed
    since = hp.parse_since(ours)["ncclTimeout"]
    old = mutate(text, "ncclTimeout                 =  8,", "")
    old = mutate(old, "ncclNumResults              =  9", "ncclNumResults              =  8")
    before = (since[0], since[1] - 1, 99)
    assert _enum_messages(hp.compare_header_to_installed(ours, old, before), "ncclResult_t") == []
    assert _enum_messages(hp.compare_header_to_installed(ours, old, version), "ncclResult_t") == [
        f"enum ncclResult_t: ncclTimeout in eplb_nccl.h but not in nccl.h {hp.vstr(version)}",
        f"enum ncclResult_t: ncclNumResults = 9 in eplb_nccl.h, 8 in nccl.h {hp.vstr(version)}",
    ]


# -- the parsers --------------------------------------------------------------------------------

SAMPLE = """
#define NCCL_MAJOR 2
#define NCCL_MINOR 21
#define NCCL_PATCH 5
#define NCCL_UNIQUE_ID_BYTES 128
#define NCCL_CONFIG_INITIALIZER {                     \\
  sizeof(ncclConfig_t), /* size */                    \\
  NCCL_CONFIG_UNDEF_INT /* blocking */                \\
}
typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;
typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4,
               ncclNumOps = 5,
               ncclMaxRedOp = 0x7fffffff>>(32-8*sizeof(ncclRedOp_dummy_t))
             } ncclRedOp_t;
typedef enum { ncclInt8 = 0, ncclChar = 0,
               ncclUint8,
               ncclFloat64 = 8, ncclDouble = 8,
#if defined(__CUDA_BF16_TYPES_EXIST__)
               ncclBfloat16   = 9,
               ncclNumTypes   = 10
#else
               ncclNumTypes   = 9
#endif
} ncclDataType_t;
typedef enum { modeDefault = INT_MIN, modeA = 1 << 0, modeB = 1 << 1, modeAll = INT_MAX } mode_t;
typedef struct ncclConfig_v21700 {
  size_t size;
  unsigned int magic;
  const char *netName; /* a comment; with punctuation */
  int splitShare;
} ncclConfig_t;
ncclResult_t  ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
    ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
ncclResult_t pncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
    ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
const char *  ncclGetErrorString(ncclResult_t result);
ncclResult_t  ncclMemAlloc(void ** ptr, size_t size);
ncclResult_t  ncclGroupStart();
ncclResult_t  ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm, ncclConfig_t* config);
ncclResult_t  ncclSignal(int peer, unsigned int flags, ncclComm_t comm); // trailing comment
"""


def test_parse_prototypes():
    protos = hp.parse_prototypes(SAMPLE)
    assert "pncclAllReduce" not in protos
    assert protos["ncclAllReduce"].argtypes == (
        "const void*", "void*", "size_t", "ncclDataType_t", "ncclRedOp_t", "ncclComm_t", "cudaStream_t",
    )  # fmt: skip
    assert protos["ncclAllReduce"].argnames[-1] == "stream"
    assert protos["ncclGetErrorString"] == hp.Prototype(
        "const char*", ("ncclResult_t",), ("result",)
    )
    assert protos["ncclMemAlloc"].argtypes == ("void**", "size_t")
    assert protos["ncclGroupStart"].argtypes == ()
    assert protos["ncclCommSplit"].argtypes[3] == "ncclComm_t*"
    assert protos["ncclSignal"].argtypes == ("int", "unsigned int", "ncclComm_t")


def test_parse_enums_aliases_ifdefs_and_expressions():
    enums = hp.parse_enums(SAMPLE)
    assert enums["ncclRedOp_t"] == {
        "ncclSum": 0,
        "ncclProd": 1,
        "ncclMax": 2,
        "ncclMin": 3,
        "ncclAvg": 4,
        "ncclNumOps": 5,
    }
    assert enums["ncclDataType_t"] == {
        "ncclInt8": 0, "ncclChar": 0, "ncclUint8": 1, "ncclFloat64": 8, "ncclDouble": 8,
        "ncclBfloat16": 9, "ncclNumTypes": 10,
    }  # fmt: skip
    assert enums["mode_t"] == {
        "modeDefault": -(2**31),
        "modeA": 1,
        "modeB": 2,
        "modeAll": 2**31 - 1,
    }


def test_parse_structs_and_sizes():
    assert hp.parse_struct(SAMPLE, "ncclConfig_t") == [
        ("size", "size_t"), ("magic", "unsigned int"), ("netName", "const char*"), ("splitShare", "int"),
    ]  # fmt: skip
    assert hp.parse_structs(SAMPLE)["ncclConfig_t"][0] == "ncclConfig_v21700"
    # 8 + 4 + (4 padding) + 8 + 4, rounded up to 8
    assert hp.c_struct_size(hp.parse_struct(SAMPLE, "ncclConfig_t")) == 32
    assert hp.parse_struct(SAMPLE, "ncclUniqueId") == [("internal", "char[128]")]
    assert hp.c_struct_size(hp.parse_struct(SAMPLE, "ncclUniqueId")) == 128
    assert hp.header_version(SAMPLE) == (2, 21, 5)
    assert hp.parse_struct(SAMPLE, "ncclNothing_t") is None


def test_parse_since():
    text = """
typedef enum { a = 0, b = 1, /* since 2.20.0 */
  c = 2 /* since 2.21.0 */ } e_t;
typedef struct { int x; /* since 2.19.0 */
  const char* name[4];   /* since 2.22.1 */ } s_t;
ncclResult_t ncclThing(int a,
                       void* b); /* since 2.23.0 */
"""
    assert hp.parse_since(text) == {
        "b": (2, 20, 0), "c": (2, 21, 0), "x": (2, 19, 0), "name": (2, 22, 1), "ncclThing": (2, 23, 0),
    }  # fmt: skip
    with pytest.raises(ValueError):
        hp.parse_since("int x; /* since 2.1.0 */ int x; /* since 2.2.0 */")


def test_normalize_and_declarators():
    assert hp.split_declarator("const char *x") == ("const char*", "x")
    assert hp.split_declarator("void ** handle") == ("void**", "handle")
    assert hp.split_declarator("unsigned int") == ("unsigned int", "")
    assert hp.split_declarator("const ncclComm_t comm") == ("const ncclComm_t", "comm")
    assert hp.split_declarator("ncclUniqueId") == ("ncclUniqueId", "")
    assert hp.split_declarator("int*") == ("int*", "")


# -- the header is real C ----------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["c", "c++"])
def test_our_header_compiles_and_matches_ctypes_layout(tmp_path, lang):
    """Compile a tiny program against eplb_nccl.h and compare its struct layout with ctypes."""
    cc = shutil.which("cc" if lang == "c" else "c++")
    if cc is None:
        pytest.skip(f"no {lang} compiler")
    newest = max(f.since for f in config.CONFIG_FIELDS)
    cls = config.struct_for(newest)
    src = tmp_path / ("probe.c" if lang == "c" else "probe.cc")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "eplb_nccl.h"',
        "int main(void) {",
        '  printf("%zu %zu\\n", sizeof(ncclConfig_t), sizeof(ncclUniqueId));',
    ]
    lines += [f'  printf("%zu\\n", offsetof(ncclConfig_t, {name}));' for name, _ in cls._fields_]
    lines += ["  return 0;", "}"]
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "probe"
    flags = ["-std=c99"] if lang == "c" else ["-std=c++11"]
    r = subprocess.run(
        [
            cc,
            *flags,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(OUR_HEADER.parent),
            str(src),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    sizes, offsets = out[:2], [int(x) for x in out[2:]]
    assert int(sizes[0]) == ctypes.sizeof(cls) == config.config_size(newest)
    assert int(sizes[1]) == table.UNIQUE_ID_BYTES == ctypes.sizeof(table.NcclUniqueIdStruct)
    assert offsets == [getattr(cls, name).offset for name, _ in cls._fields_]


# -- the CUDA driver table against csrc_headers/eplb_cuda.h -----------------------------------

CUDA_HEADER = REPO / "csrc_headers" / "eplb_cuda.h"


def _cuda_table() -> dict:
    return {
        f.name: hp.Prototype(f.restype, tuple(t for t, _ in f.args), tuple(n for _, n in f.args))
        for f in table.CUDA_FUNCTIONS
    }


def cuda_disagreements(header_text: str) -> list[str]:
    ours = hp.parse_prototypes(header_text, prefix="cu")
    tab = _cuda_table()
    return hp.compare_prototypes(tab, ours, "table.py", "eplb_cuda.h") + hp.compare_prototypes(
        ours, tab, "eplb_cuda.h", "table.py"
    )


def test_cuda_table_agrees_with_our_cuda_header():
    assert cuda_disagreements(CUDA_HEADER.read_text()) == []


def test_cuda_optional_and_raw_names_are_declared():
    names = {f.name for f in table.CUDA_FUNCTIONS}
    assert table.CUDA_OPTIONAL <= names and table.CUDA_RAW <= names
    # the optional ones are exactly those the header lists under "optional"
    text = CUDA_HEADER.read_text()
    optional = hp.parse_prototypes(text[text.index("/* optional: CUDA 12.8+") :], prefix="cu")
    assert set(optional) == set(table.CUDA_OPTIONAL)


def test_changed_cuda_argument_type_is_reported():
    text = mutate(
        CUDA_HEADER.read_text(),
        "CUresult cuEventRecord(CUevent hEvent, CUstream hStream);",
        "CUresult cuEventRecord(CUevent hEvent, int hStream);",
    )
    assert cuda_disagreements(text) == [
        "function cuEventRecord: argument 2 type 'CUstream' in table.py, 'int' in eplb_cuda.h",
        "function cuEventRecord: argument 2 type 'int' in eplb_cuda.h, 'CUstream' in table.py",
    ]


def test_cuda_function_missing_from_header_is_reported():
    text = mutate(CUDA_HEADER.read_text(), "CUresult cuGraphUpload(", "CUresult xxGraphUpload(")
    assert cuda_disagreements(text) == [
        "function cuGraphUpload: in table.py but not in eplb_cuda.h"
    ]


def test_every_cuda_type_has_a_ctypes_type():
    for f in table.CUDA_FUNCTIONS:
        assert f.restype in table.CTYPES, f.name
        for t, _ in f.args:
            assert t in table.CTYPES, (f.name, t)
