"""Small parsers for NCCL-style C headers, and the checks built on them.

Used by ``tests/test_header.py`` and ``tools/abi_matrix.py``. No pytest here, and nothing from
``eplb_pynccl`` is imported at module level (so the tool can point the package at another
libnccl before importing it).

What is parsed (comments and preprocessor lines are removed first):

* prototypes ``RET nccl<Name>(ARGS);`` (one or several lines; ``pnccl*`` profiling twins are
  ignored), as the return type and the argument types with parameter names dropped and spacing
  normalised (``const char *x`` -> ``const char*``, ``void ** p`` -> ``void**``);
* ``typedef enum { ... } NAME;`` bodies, as ``{enumerator: value}``: aliases (``ncclChar = 0``),
  implicit values, references to earlier enumerators, ``INT_MIN``/``INT_MAX`` and simple
  integer arithmetic are evaluated; an enumerator whose value cannot be evaluated (``sizeof``)
  is left out, and the first definition wins when both branches of an ``#if`` define one;
* ``typedef struct [TAG] { ... } NAME;`` bodies, as an ordered ``[(field, type)]``;
* ``/* since X.Y.Z */`` annotations of this project's header (see its top comment).

Every ``compare_*`` function returns a list of human-readable disagreements; empty means the
two sides agree.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

Version = tuple[int, int, int]

OUR_LABEL = "eplb_nccl.h"
TABLE_LABEL = "table.py"
CONFIG_LABEL = "config.py"

# The enums this project declares, and the table attribute each one mirrors.
ENUMS = ("ncclResult_t", "ncclDataType_t", "ncclRedOp_t")
CONFIG_TYPEDEF = "ncclConfig_t"

_SINCE_RE = re.compile(r"/\*\s*since\s+(\d+)\.(\d+)\.(\d+)\s*\*/")
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_C_TYPE_WORDS = frozenset(
    "void char short int long float double signed unsigned const volatile struct enum".split()
)


class Prototype(NamedTuple):
    restype: str
    argtypes: tuple[str, ...]
    argnames: tuple[str, ...]

    def signature(self) -> str:
        return f"{self.restype} ({', '.join(self.argtypes)})"


# -- text cleaning ---------------------------------------------------------------------------


def strip_comments(text: str) -> str:
    """Remove ``/* */`` and ``//`` comments (a block comment becomes one space, newlines kept)."""

    def block(m: re.Match) -> str:
        return " " + "\n" * m.group(0).count("\n")

    text = re.sub(r"/\*.*?\*/", block, text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def strip_preprocessor(text: str) -> str:
    """Remove preprocessor lines, including their backslash-continued lines."""
    out: list[str] = []
    continued = False
    for line in text.split("\n"):
        if continued or line.lstrip().startswith("#"):
            continued = line.rstrip().endswith("\\")
            out.append("")
            continue
        out.append(line)
    return "\n".join(out)


def clean(text: str) -> str:
    return strip_preprocessor(strip_comments(text))


def normalize_type(t: str) -> str:
    """Canonical spelling of a C type: single spaces, ``*`` glued to what precedes it."""
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\s*\*\s*", "*", t)
    return t


def split_declarator(decl: str) -> tuple[str, str]:
    """``'const char *netName'`` -> ``('const char*', 'netName')``; unnamed -> ``(type, '')``.

    An array declarator keeps its size on the type: ``char internal[128]`` ->
    ``('char[128]', 'internal')``.
    """
    decl = decl.strip()
    dims = "".join(re.findall(r"\[[^\]]*\]", decl))
    decl = re.sub(r"\[[^\]]*\]", "", decl).strip()
    m = re.search(r"([A-Za-z_]\w*)\s*$", decl)
    head = decl
    name = ""
    if m:
        words = _IDENT_RE.findall(decl)
        before = decl[: m.start()]
        # The trailing identifier is a parameter name unless it is itself part of the type:
        # a lone word (``int``), a C type keyword (``unsigned int``).
        if len(words) > 1 and m.group(1) not in _C_TYPE_WORDS and before.strip():
            name = m.group(1)
            head = before
    return normalize_type(head) + re.sub(r"\s+", "", dims), name


# -- (a) prototypes --------------------------------------------------------------------------

_PROTO_RE = re.compile(
    r"^\s*(?P<ret>[A-Za-z_][\w\s\*]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\((?P<args>[^()]*)\)\s*$",
    re.S,
)


def parse_prototypes(text: str, prefix: str = "nccl") -> dict[str, Prototype]:
    """Function declarations whose name starts with ``prefix`` (so ``pnccl*`` is skipped)."""
    body = clean(text)
    out: dict[str, Prototype] = {}
    for stmt in re.split(r"[;{}]", body):
        m = _PROTO_RE.match(stmt)
        if not m or not m.group("name").startswith(prefix):
            continue
        ret = normalize_type(m.group("ret"))
        if ret.startswith("typedef") or ret in ("", "return"):
            continue
        raw_args = m.group("args").strip()
        types: list[str] = []
        names: list[str] = []
        if raw_args and raw_args != "void":
            for a in raw_args.split(","):
                t, n = split_declarator(a)
                types.append(t)
                names.append(n)
        out.setdefault(m.group("name"), Prototype(ret, tuple(types), tuple(names)))
    return out


# -- (b) enums -------------------------------------------------------------------------------

_ENUM_RE = re.compile(
    r"typedef\s+enum\s*(?:[A-Za-z_]\w*)?\s*\{(?P<body>[^{}]*)\}\s*(?P<name>[A-Za-z_]\w*)\s*;"
)
_C_CONSTANTS = {"INT_MIN": -(2**31), "INT_MAX": 2**31 - 1, "UINT_MAX": 2**32 - 1}
_INT_LITERAL = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b")


def _eval_int(expr: str, names: Mapping[str, int]) -> int | None:
    """Evaluate a C integer constant expression made of literals, known names and + - * / % <<
    >> | & ^ ~ and parentheses; None when anything else (``sizeof``, casts) appears."""
    expr = _INT_LITERAL.sub(lambda m: str(int(m.group(1), 0)), expr.strip())

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            if node.id in _C_CONSTANTS:
                return _C_CONSTANTS[node.id]
            raise ValueError(node.id)
        if isinstance(node, ast.UnaryOp):
            v = value(node.operand)
            ops = {ast.USub: lambda: -v, ast.UAdd: lambda: v, ast.Invert: lambda: ~v}
            if type(node.op) in ops:
                return ops[type(node.op)]()
        if isinstance(node, ast.BinOp):
            a, b = value(node.left), value(node.right)
            ops = {
                ast.Add: lambda: a + b,
                ast.Sub: lambda: a - b,
                ast.Mult: lambda: a * b,
                ast.FloorDiv: lambda: int(a / b),
                ast.Div: lambda: int(a / b),
                ast.Mod: lambda: a % b,
                ast.LShift: lambda: a << b,
                ast.RShift: lambda: a >> b,
                ast.BitOr: lambda: a | b,
                ast.BitAnd: lambda: a & b,
                ast.BitXor: lambda: a ^ b,
            }
            if type(node.op) in ops:
                return ops[type(node.op)]()
        raise ValueError(ast.dump(node))

    try:
        return value(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def parse_enum_body(body: str) -> dict[str, int]:
    out: dict[str, int] = {}
    nxt: int | None = 0
    # Commas and newlines both end an enumerator: after the preprocessor lines of an #if/#else
    # are removed, the two branches' last enumerators may sit on adjacent lines with no comma.
    for item in re.split(r"[,\n]", body):
        item = item.strip()
        if not item:
            continue
        name, eq, expr = item.partition("=")
        name = name.strip()
        if not _IDENT_RE.fullmatch(name):
            continue
        val = _eval_int(expr, out) if eq else nxt
        if val is not None and name not in out:
            out[name] = val
        nxt = None if val is None else val + 1
    return out


def parse_enums(text: str) -> dict[str, dict[str, int]]:
    """Every ``typedef enum {...} NAME;`` -> ``{NAME: {enumerator: value}}``."""
    return {
        m.group("name"): parse_enum_body(m.group("body")) for m in _ENUM_RE.finditer(clean(text))
    }


# -- (c) structs -----------------------------------------------------------------------------

_STRUCT_RE = re.compile(
    r"typedef\s+struct\s*(?P<tag>[A-Za-z_]\w*)?\s*\{(?P<body>[^{}]*)\}\s*(?P<name>[A-Za-z_]\w*)\s*;"
)
_DEFINE_RE = re.compile(
    r"^\s*#\s*define\s+([A-Za-z_]\w*)\s+(\(?-?(?:0[xX][0-9a-fA-F]+|\d+)[uUlL]*\)?)\s*$", re.M
)


def parse_defines(text: str) -> dict[str, int]:
    """Object-like ``#define NAME <integer literal>`` macros."""
    out: dict[str, int] = {}
    for name, lit in _DEFINE_RE.findall(strip_comments(text)):
        v = _eval_int(lit, {})
        if v is not None:
            out.setdefault(name, v)
    return out


def parse_structs(text: str) -> dict[str, tuple[str | None, list[tuple[str, str]]]]:
    """Every brace-free ``typedef struct [TAG] {...} NAME;`` -> ``{NAME: (TAG, [(field, type)])}``.

    Array sizes given by a simple ``#define`` are replaced by their value.
    """
    defines = parse_defines(text)
    out: dict[str, tuple[str | None, list[tuple[str, str]]]] = {}
    for m in _STRUCT_RE.finditer(clean(text)):
        fields = []
        for decl in m.group("body").split(";"):
            if decl.strip():
                t, n = split_declarator(decl)
                t = re.sub(
                    r"\[([A-Za-z_]\w*)\]",
                    lambda d: f"[{defines[d.group(1)]}]" if d.group(1) in defines else d.group(0),
                    t,
                )
                fields.append((n, t))
        out.setdefault(m.group("name"), (m.group("tag"), fields))
    return out


def parse_struct(text: str, typedef_name: str) -> list[tuple[str, str]] | None:
    """The ``(field, type)`` list of one typedef'd struct, or None if the header lacks it."""
    got = parse_structs(text).get(typedef_name)
    return None if got is None else got[1]


def parse_typedefs(text: str) -> dict[str, str]:
    """Simple ``typedef TYPE NAME;`` (no braces) -> ``{NAME: normalised TYPE}``."""
    out: dict[str, str] = {}
    for stmt in re.split(r"[;{}]", clean(text)):
        m = re.fullmatch(r"\s*typedef\s+([^()]+?)\s*\b([A-Za-z_]\w*)\s*", stmt, re.S)
        if m:
            out.setdefault(m.group(2), normalize_type(m.group(1)))
    return out


def header_version(text: str) -> Version | None:
    d = parse_defines(text)
    try:
        return d["NCCL_MAJOR"], d["NCCL_MINOR"], d["NCCL_PATCH"]
    except KeyError:
        return None


# -- C layout --------------------------------------------------------------------------------

# Sizes (= alignments) of the scalar types on the LP64 ABIs NCCL ships for (x86-64, aarch64).
_SCALAR_SIZES = {
    "char": 1, "signed char": 1, "unsigned char": 1, "int8_t": 1, "uint8_t": 1,
    "short": 2, "unsigned short": 2, "int16_t": 2, "uint16_t": 2,
    "int": 4, "unsigned int": 4, "unsigned": 4, "int32_t": 4, "uint32_t": 4, "float": 4,
    "long": 8, "unsigned long": 8, "long long": 8, "unsigned long long": 8,
    "int64_t": 8, "uint64_t": 8, "size_t": 8, "double": 8,
}  # fmt: skip
POINTER_SIZE = 8


def c_type_size_align(t: str, enums: Iterable[str] = ENUMS) -> tuple[int, int]:
    t = normalize_type(t)
    m = re.fullmatch(r"(.*?)((?:\[\d+\])+)", t)
    if m:
        size, align = c_type_size_align(m.group(1), enums)
        for n in re.findall(r"\[(\d+)\]", m.group(2)):
            size *= int(n)
        return size, align
    if t.endswith("*"):
        return POINTER_SIZE, POINTER_SIZE
    base = re.sub(r"\b(const|volatile)\b", "", t).strip()
    base = re.sub(r"\s+", " ", base)
    if base in _SCALAR_SIZES:
        return _SCALAR_SIZES[base], _SCALAR_SIZES[base]
    if base in set(enums):
        return 4, 4
    raise ValueError(f"no known size for C type {t!r}")


def c_struct_size(fields: Sequence[tuple[str, str]]) -> int:
    """sizeof of a struct with these ``(name, type)`` fields under the usual C layout rules:
    each field at the next multiple of its alignment, the total rounded up to the largest."""
    offset = 0
    max_align = 1
    for _, t in fields:
        size, align = c_type_size_align(t)
        offset = -(-offset // align) * align + size
        max_align = max(max_align, align)
    return -(-offset // max_align) * max_align


# -- (d) since annotations -------------------------------------------------------------------


def _annotated_name(before: str) -> str | None:
    """The name declared by the text that ends right before a ``/* since */`` comment."""
    s = strip_comments(before).rstrip()
    if s.endswith((";", ",")):
        s = s[:-1].rstrip()
    if s.endswith(")"):  # a prototype: the identifier before its parameter list
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ")":
                depth += 1
            elif s[i] == "(":
                depth -= 1
                if depth == 0:
                    m = re.search(r"([A-Za-z_]\w*)\s*$", s[:i])
                    return m.group(1) if m else None
        return None
    seg = re.split(r"[;,{}]", s)[-1]
    if "=" in seg:  # an enumerator with a value
        seg = seg.split("=", 1)[0]
    seg = re.sub(r"\[[^\]]*\]", "", seg)
    m = re.search(r"([A-Za-z_]\w*)\s*$", seg)
    return m.group(1) if m else None


def parse_since(text: str) -> dict[str, Version]:
    """``{declared name: version}`` for every ``/* since X.Y.Z */`` annotation."""
    out: dict[str, Version] = {}
    for m in _SINCE_RE.finditer(text):
        name = _annotated_name(text[: m.start()])
        if name is None:
            raise ValueError(f"cannot tell what the annotation at offset {m.start()} annotates")
        if name in out:
            raise ValueError(f"{name} has two since annotations")
        out[name] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return out


def vstr(v: Sequence[int]) -> str:
    return ".".join(str(x) for x in v)


# -- comparisons -----------------------------------------------------------------------------


def _is_count(name: str) -> bool:
    """Count sentinels (ncclNumResults, ncclNumTypes, ncclNumOps) move as members are added."""
    return name.startswith("ncclNum")


def compare_prototypes(
    a: Mapping[str, Prototype], b: Mapping[str, Prototype], a_label: str, b_label: str
) -> list[str]:
    """Every function of ``a`` must be in ``b`` with the same types (``b`` may have more)."""
    out: list[str] = []
    for name, pa in a.items():
        pb = b.get(name)
        if pb is None:
            out.append(f"function {name}: in {a_label} but not in {b_label}")
            continue
        if pa.restype != pb.restype:
            out.append(
                f"function {name}: return type '{pa.restype}' in {a_label}, '{pb.restype}' in {b_label}"
            )
        if len(pa.argtypes) != len(pb.argtypes):
            out.append(
                f"function {name}: {len(pa.argtypes)} arguments in {a_label}, "
                f"{len(pb.argtypes)} in {b_label}"
            )
            continue
        for i, (ta, tb) in enumerate(zip(pa.argtypes, pb.argtypes, strict=True), 1):
            if ta != tb:
                out.append(
                    f"function {name}: argument {i} type '{ta}' in {a_label}, '{tb}' in {b_label}"
                )
    return out


def compare_enum(
    name: str, a: Mapping[str, int], b: Mapping[str, int], a_label: str, b_label: str
) -> list[str]:
    """Both sides must have the same enumerators with the same values."""
    out: list[str] = []
    for k, v in a.items():
        if k not in b:
            out.append(f"enum {name}: {k} in {a_label} but not in {b_label}")
        elif b[k] != v:
            out.append(f"enum {name}: {k} = {v} in {a_label}, {b[k]} in {b_label}")
    for k in b:
        if k not in a:
            out.append(f"enum {name}: {k} in {b_label} but not in {a_label}")
    return out


def compare_fields(
    what: str,
    a: Sequence[tuple[str, str]],
    b: Sequence[tuple[str, str]],
    a_label: str,
    b_label: str,
) -> list[str]:
    """Same fields, same types, same order. Positions in messages are 1-based."""
    out: list[str] = []
    for i, (fa, fb) in enumerate(zip(a, b, strict=False), 1):
        if fa != fb:
            out.append(
                f"{what} field {i}: '{fa[0]}' ({fa[1]}) in {a_label}, '{fb[0]}' ({fb[1]}) in {b_label}"
            )
    if len(a) != len(b):
        longer, label = (a, a_label) if len(a) > len(b) else (b, b_label)
        extra = ", ".join(f[0] for f in longer[min(len(a), len(b)) :])
        out.append(
            f"{what}: {len(a)} fields in {a_label}, {len(b)} in {b_label} (only in {label}: {extra})"
        )
    return out


class Ours(NamedTuple):
    """What this project's header declares."""

    prototypes: dict[str, Prototype]
    enums: dict[str, dict[str, int]]
    config: list[tuple[str, str]]
    since: dict[str, Version]
    unique_id: list[tuple[str, str]] | None
    typedefs: dict[str, str]


def parse_ours(text: str) -> Ours:
    return Ours(
        parse_prototypes(text),
        parse_enums(text),
        parse_struct(text, CONFIG_TYPEDEF) or [],
        parse_since(text),
        parse_struct(text, "ncclUniqueId"),
        parse_typedefs(text),
    )


def compare_table_to_header(
    header_text: str,
    *,
    functions: Iterable,
    enums: Mapping[str, Mapping[str, int]],
    datatype_since: Mapping[str, Version],
    config_fields: Iterable,
    unique_id_bytes: int | None = None,
) -> list[str]:
    """table.py / config.py against this project's header.

    ``functions``: table.FUNCTIONS (``.name``, ``.restype``, ``.args`` of ``(type, name)``);
    ``enums``: ``{"ncclResult_t": {name: code}, ...}`` (from table.Result, ...); ``config_fields``: CONFIG_FIELDS
    (``.c_name``, ``.c_type``, ``.since``). Count sentinels (``ncclNum*``) of the header are
    not expected in the table.
    """
    ours = parse_ours(header_text)
    out: list[str] = []
    out += _table_functions(ours, functions)
    out += _table_enums(ours, enums)
    out += _table_datatype_since(ours, datatype_since)
    out += _table_config(ours, list(config_fields))
    if unique_id_bytes is not None:
        out += _table_unique_id(ours, unique_id_bytes)
    return out


def _table_functions(ours: Ours, functions: Iterable) -> list[str]:
    """table.FUNCTIONS against the header's prototypes, both ways."""
    table_protos = {
        f.name: Prototype(
            normalize_type(f.restype),
            tuple(normalize_type(t) for t, _ in f.args),
            tuple(n for _, n in f.args),
        )
        for f in functions
    }
    out = compare_prototypes(table_protos, ours.prototypes, TABLE_LABEL, OUR_LABEL)
    for name in ours.prototypes:
        if name not in table_protos:
            out.append(f"function {name}: in {OUR_LABEL} but not in {TABLE_LABEL}")
    return out


def _table_enums(ours: Ours, enums: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The table's enums against the header's (less its count sentinels)."""
    out: list[str] = []
    for ename, members in enums.items():
        got = ours.enums.get(ename)
        if got is None:
            out.append(f"enum {ename}: in {TABLE_LABEL} but not in {OUR_LABEL}")
            continue
        got = {k: v for k, v in got.items() if not _is_count(k)}
        out += compare_enum(ename, dict(members), got, TABLE_LABEL, OUR_LABEL)
    return out


def _table_datatype_since(ours: Ours, datatype_since: Mapping[str, Version]) -> list[str]:
    """table.Dtype.since against the header's since annotations of ncclDataType_t, both ways."""
    out: list[str] = []
    dtypes = ours.enums.get("ncclDataType_t", {})
    annotated = {k: v for k, v in ours.since.items() if k in dtypes}
    for k, v in datatype_since.items():
        if k not in annotated:
            out.append(f"since {k}: {vstr(v)} in table.Dtype.since, no annotation in {OUR_LABEL}")
        elif tuple(annotated[k]) != tuple(v):
            out.append(
                f"since {k}: {vstr(v)} in table.Dtype.since, {vstr(annotated[k])} in {OUR_LABEL}"
            )
    for k, v in annotated.items():
        if k not in datatype_since:
            out.append(f"since {k}: {vstr(v)} in {OUR_LABEL}, not in table.Dtype.since")
    return out


def _table_config(ours: Ours, cfg: list) -> list[str]:
    """CONFIG_FIELDS against the header's ncclConfig_t: fields, then each field's since."""
    out = compare_fields(
        CONFIG_TYPEDEF,
        [(f.c_name, normalize_type(f.c_type)) for f in cfg],
        ours.config,
        CONFIG_LABEL,
        OUR_LABEL,
    )
    ours_cfg_names = {n for n, _ in ours.config}
    for f in cfg:
        if f.c_name not in ours_cfg_names:
            continue
        got_since = ours.since.get(f.c_name)
        if got_since is None:
            out.append(f"{CONFIG_TYPEDEF} field {f.c_name}: no since annotation in {OUR_LABEL}")
        elif tuple(got_since) != tuple(f.since):
            out.append(
                f"{CONFIG_TYPEDEF} field {f.c_name}: since {vstr(f.since)} in {CONFIG_LABEL}, "
                f"{vstr(got_since)} in {OUR_LABEL}"
            )
    return out


def _table_unique_id(ours: Ours, unique_id_bytes: int) -> list[str]:
    """The table's ncclUniqueId size against the header's struct."""
    if ours.unique_id is None:
        return [f"ncclUniqueId: not declared in {OUR_LABEL}"]
    size = c_struct_size(ours.unique_id)
    if size != unique_id_bytes:
        return [f"ncclUniqueId: {unique_id_bytes} bytes in {TABLE_LABEL}, {size} in {OUR_LABEL}"]
    return []


def compare_header_to_installed(
    header_text: str, installed_text: str, version: Version
) -> list[str]:
    """This project's header against an installed ``nccl.h`` of NCCL ``version``.

    * every prototype of ours (with ``since`` <= version) is in nccl.h with identical types;
    * every enumerator of ours (``since`` <= version) has the same value there; one with a later
      ``since`` must be absent; a count sentinel (``ncclNum*``) is compared only when every
      member of its enum is due at this version;
    * our ncclConfig_t fields with ``since`` <= version are exactly nccl.h's fields, same names,
      types and order;
    * ncclUniqueId has the same size, ncclComm_t the same definition.
    """
    ours = parse_ours(header_text)
    label = f"nccl.h {vstr(version)}"
    v = tuple(version)

    def due(name: str) -> bool:
        return tuple(ours.since.get(name, (0, 0, 0))) <= v

    out: list[str] = []
    out += _installed_prototypes(ours, installed_text, label, due)
    out += _installed_enums(ours, installed_text, label, due)
    out += _installed_config(ours, installed_text, label, due)
    out += _installed_unique_id_and_comm(ours, installed_text, label)
    return out


def _installed_prototypes(
    ours: Ours, installed_text: str, label: str, due: Callable[[str], bool]
) -> list[str]:
    """Our due prototypes are in nccl.h, identical; those not yet due are absent."""
    theirs = parse_prototypes(installed_text)
    out = compare_prototypes(
        {k: p for k, p in ours.prototypes.items() if due(k)}, theirs, OUR_LABEL, label
    )
    for k in ours.prototypes:
        if not due(k) and k in theirs:
            out.append(
                f"function {k}: in {label} although {OUR_LABEL} says since {vstr(ours.since[k])}"
            )
    return out


def _installed_enums(
    ours: Ours, installed_text: str, label: str, due: Callable[[str], bool]
) -> list[str]:
    """Our due enumerators have nccl.h's values; those not yet due are absent."""
    out: list[str] = []
    their_enums = parse_enums(installed_text)
    for ename in ENUMS:
        mine = ours.enums.get(ename)
        if mine is None:
            out.append(f"enum {ename}: not declared in {OUR_LABEL}")
            continue
        got = their_enums.get(ename)
        if got is None:
            out.append(f"enum {ename}: in {OUR_LABEL} but not in {label}")
            continue
        all_due = all(due(k) for k in mine if not _is_count(k))
        for k, val in mine.items():
            if _is_count(k) and not all_due:
                continue
            if not due(k):
                if k in got:
                    out.append(
                        f"enum {ename}: {k} in {label} although {OUR_LABEL} says since {vstr(ours.since[k])}"
                    )
            elif k not in got:
                out.append(f"enum {ename}: {k} in {OUR_LABEL} but not in {label}")
            elif got[k] != val:
                out.append(f"enum {ename}: {k} = {val} in {OUR_LABEL}, {got[k]} in {label}")
    return out


def _installed_config(
    ours: Ours, installed_text: str, label: str, due: Callable[[str], bool]
) -> list[str]:
    """Our due ncclConfig_t fields are exactly nccl.h's."""
    their_cfg = parse_struct(installed_text, CONFIG_TYPEDEF)
    if their_cfg is None:
        return [f"{CONFIG_TYPEDEF}: not in {label}"]
    return compare_fields(
        CONFIG_TYPEDEF, [f for f in ours.config if due(f[0])], their_cfg, OUR_LABEL, label
    )


def _installed_unique_id_and_comm(ours: Ours, installed_text: str, label: str) -> list[str]:
    """ncclUniqueId of the same size, ncclComm_t of the same definition."""
    out: list[str] = []
    their_uid = parse_struct(installed_text, "ncclUniqueId")
    if ours.unique_id is None or their_uid is None:
        out.append(f"ncclUniqueId: missing from {OUR_LABEL if ours.unique_id is None else label}")
    elif c_struct_size(ours.unique_id) != c_struct_size(their_uid):
        out.append(
            f"ncclUniqueId: {c_struct_size(ours.unique_id)} bytes in {OUR_LABEL}, "
            f"{c_struct_size(their_uid)} in {label}"
        )
    their_td = parse_typedefs(installed_text)
    if ours.typedefs.get("ncclComm_t") != their_td.get("ncclComm_t"):
        out.append(
            f"typedef ncclComm_t: '{ours.typedefs.get('ncclComm_t')}' in {OUR_LABEL}, "
            f"'{their_td.get('ncclComm_t')}' in {label}"
        )
    return out


def installed_config_size(installed_text: str) -> int | None:
    """sizeof(ncclConfig_t) computed from an installed nccl.h's struct."""
    fields = parse_struct(installed_text, CONFIG_TYPEDEF)
    return None if fields is None else c_struct_size(fields)


def project_disagreements(header_text: str) -> list[str]:
    """:func:`compare_table_to_header` fed from the eplb_pynccl package (imported lazily)."""
    from eplb_pynccl._nccl import config, table

    return compare_table_to_header(
        header_text,
        functions=table.FUNCTIONS,
        enums={
            "ncclResult_t": {m.name: int(m) for m in table.Result},
            "ncclDataType_t": {m.name: int(m) for m in table.Dtype},
            "ncclRedOp_t": {m.name: int(m) for m in table.RedOp},
        },
        datatype_since={m.name: m.since for m in table.Dtype if m.since is not None},
        config_fields=config.CONFIG_FIELDS,
        unique_id_bytes=table.UNIQUE_ID_BYTES,
    )
