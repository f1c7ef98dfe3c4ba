#!/usr/bin/env python
"""Check eplb_pynccl against every NCCL minor release on PyPI (``make test-abi``).

For each minor from 2.19 to the newest published one, the latest nvidia-nccl-cu12 wheel of
that minor is downloaded (with this interpreter's pip) into a cache outside the repository
(default ``~/.cache/eplb_pynccl/abi``, ``--cache`` to change it), and its ``libnccl.so.2`` and
``nccl.h`` are unpacked. Then, per release:

* in a fresh interpreter with ``EPLB_PYNCCL_NCCL_SO`` pointing at that library: the library
  loads, reports the wheel's version, hands out a 128-byte unique id, and creating a
  one-rank ``Communicator`` fails with an ``NcclError`` (there is no GPU where this runs) rather
  than crashing the process;
* ``csrc_headers/eplb_nccl.h`` agrees with that release's ``nccl.h``
  (``tests/header_parse.compare_header_to_installed``);
* ``config.config_size(version)`` equals sizeof(ncclConfig_t) computed from that ``nccl.h``.

The result is printed as a Markdown table and written to ``docs/abi_matrix.md``. The exit
status is non-zero when any row fails. ``--all-patches`` checks every patch release instead of
the newest of each minor (useful when a field appeared in a patch release).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import header_parse as hp  # noqa: E402

PACKAGE = "nvidia-nccl-cu12"
FIRST_MINOR = 19
DEFAULT_CACHE = Path("~/.cache/eplb_pynccl/abi").expanduser()
OUR_HEADER = REPO / "csrc_headers" / "eplb_nccl.h"
DEFAULT_OUTPUT = REPO / "docs" / "abi_matrix.md"
PROBE_TIMEOUT_S = 180


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- versions and downloads ------------------------------------------------------------------


def parse_version(s: str) -> tuple[int, ...]:
    """'2.25.1.post1' -> (2, 25, 1, 1); '2.19.3' -> (2, 19, 3, 0)."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", s.strip())
    if not m:
        raise ValueError(f"unexpected version {s!r}")
    return tuple(int(g or 0) for g in m.groups())


def pip(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def published_versions() -> list[str] | None:
    """Versions of the wheel package on the index, newest first (None if pip cannot tell)."""
    r = pip("index", "versions", PACKAGE, "--disable-pip-version-check", timeout=300)
    m = re.search(r"Available versions:\s*(.+)", r.stdout)
    if r.returncode != 0 or not m:
        return None
    out = []
    for v in m.group(1).split(","):
        try:
            parse_version(v)
            out.append(v.strip())
        except ValueError:
            continue
    return sorted(out, key=parse_version, reverse=True)


def download(spec: str, dest: Path) -> tuple[Path | None, str]:
    """``pip download`` one wheel; (path, "") or (None, why)."""
    dest.mkdir(parents=True, exist_ok=True)
    r = pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        spec,
    )
    text = r.stdout + "\n" + r.stderr
    if r.returncode != 0:
        if "No matching distribution" in text or "Could not find a version" in text:
            return None, "no wheel on the index"
        tail = text.strip().splitlines()[-1:] or ["?"]
        return None, f"pip download failed: {tail[0]}"
    for pat in (r"Saved (\S+\.whl)", r"File was already downloaded (\S+\.whl)"):
        m = re.search(pat, text)
        if m:
            p = Path(m.group(1))
            return (p if p.is_absolute() else dest / p.name), ""
    return None, "pip download succeeded but named no wheel"


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def unpack(wheel: Path, dest: Path) -> tuple[Path, Path]:
    """Extract libnccl.so.2 and nccl.h of a wheel into ``dest`` (once)."""
    so, header = dest / "libnccl.so.2", dest / "nccl.h"
    if so.exists() and header.exists():
        return so, header
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            for target, suffix in ((so, "nccl/lib/libnccl.so.2"), (header, "nccl/include/nccl.h")):
                if member.endswith(suffix):
                    tmp = target.with_suffix(target.suffix + ".part")
                    with z.open(member) as src, open(tmp, "wb") as dst:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                    tmp.replace(target)
    if not (so.exists() and header.exists()):
        raise RuntimeError(f"{wheel.name} has no nvidia/nccl/lib/libnccl.so.2 or include/nccl.h")
    return so, header


class Release(NamedTuple):
    version: str  # the wheel's version string
    so: Path
    header: Path


def gather(
    cache: Path, all_patches: bool, only: list[str] | None
) -> tuple[list[Release], list[str]]:
    """Download and unpack the releases to check; returns them and notes on skipped ones."""
    wheels_dir = cache / "wheels"
    notes: list[str] = []
    published = published_versions()
    if published is None:
        notes.append(f"`pip index versions {PACKAGE}` gave no list; minors were probed one by one")

    specs: list[tuple[str, str]] = []  # (label, pip requirement)
    if only:
        specs = [(v, f"{PACKAGE}=={v}") for v in only]
    elif all_patches and published:
        newest: dict[tuple[int, ...], str] = {}
        for v in published:
            key = parse_version(v)[:3]
            if key[1] >= FIRST_MINOR and (
                key not in newest or parse_version(v) > parse_version(newest[key])
            ):
                newest[key] = v
        specs = [(v, f"{PACKAGE}=={v}") for _, v in sorted(newest.items())]
    else:
        if published:
            last_minor = max(parse_version(v)[1] for v in published if parse_version(v)[0] == 2)
        else:
            last_minor = None
        minor = FIRST_MINOR
        misses = 0
        while (last_minor is None and misses < 3) or (
            last_minor is not None and minor <= last_minor
        ):
            specs.append((f"2.{minor}", f"{PACKAGE}==2.{minor}.*"))
            minor += 1
            if last_minor is None:  # probing: stop after three missing minors in a row
                _, why = download(specs[-1][1], wheels_dir)
                misses = misses + 1 if why else 0
        if last_minor is None:
            specs = specs[: len(specs) - misses]

    releases: list[Release] = []
    for label, spec in specs:
        log(f"[abi] fetching {spec}")
        wheel, why = download(spec, wheels_dir)
        if wheel is None:
            notes.append(f"{label}: skipped ({why})")
            log(f"[abi]   skipped: {why}")
            continue
        ver = wheel_version(wheel)
        so, header = unpack(wheel, cache / "unpacked" / ver)
        releases.append(Release(ver, so, header))
    return releases, notes


# -- the per-library probe (runs in a fresh interpreter) -------------------------------------


def probe() -> dict:
    """Load the library named by EPLB_PYNCCL_NCCL_SO and exercise the basics. Never raises."""
    res: dict = {}
    try:
        import eplb_pynccl
        from eplb_pynccl import _nccl
    except Exception as e:  # noqa: BLE001 - the report says what went wrong
        res["load_error"] = f"import eplb_pynccl: {type(e).__name__}: {e}"
        return res
    try:
        if hasattr(eplb_pynccl, "nccl_version") and hasattr(eplb_pynccl, "library_path"):
            res["version"] = list(eplb_pynccl.nccl_version())
            res["path"] = str(eplb_pynccl.library_path())
            res["api"] = "eplb_pynccl.nccl_version()/library_path()"
        else:
            lib = _nccl.load()
            res["version"] = list(lib.version)
            res["path"] = lib.path
            res["api"] = "eplb_pynccl._nccl.load() (public functions not there yet)"
    except Exception as e:  # noqa: BLE001
        res["load_error"] = f"{type(e).__name__}: {e}"
        return res

    unique_id = getattr(eplb_pynccl, "UniqueId", None)
    try:
        if unique_id is not None and hasattr(unique_id, "generate"):
            uid = unique_id.generate()
            raw = None
            for attr in ("to_bytes", "__bytes__"):
                if hasattr(uid, attr):
                    raw = getattr(uid, attr)()
                    break
            if raw is None:
                for attr in ("bytes", "data", "internal"):
                    if isinstance(getattr(uid, attr, None), bytes | bytearray):
                        raw = bytes(getattr(uid, attr))
                        break
            res["uid_len"] = len(raw) if raw is not None else None
            res["uid_api"] = "eplb_pynccl.UniqueId.generate()"
        else:
            res["uid_len"] = len(_nccl.load().get_unique_id())
            res["uid_api"] = "eplb_pynccl._nccl.load().get_unique_id() (UniqueId not there yet)"
    except Exception as e:  # noqa: BLE001
        res["uid_error"] = f"{type(e).__name__}: {e}"

    nccl_error = getattr(eplb_pynccl, "NcclError", None)
    if nccl_error is None:
        from eplb_pynccl.errors import NcclError as nccl_error
    communicator = getattr(eplb_pynccl, "Communicator", None)
    try:
        if communicator is not None and unique_id is not None:
            res["init_api"] = "eplb_pynccl.Communicator"
            comm = communicator(unique_id.generate(), 0, 1)
            res["init_created"] = True
            for closer in ("abort", "close", "destroy"):
                if hasattr(comm, closer):
                    getattr(comm, closer)()
                    break
        else:
            res["init_api"] = "eplb_pynccl._nccl (Communicator not there yet)"
            lib = _nccl.load()
            comm, _ = lib.comm_init_rank(1, lib.get_unique_id(), 0, None)
            res["init_created"] = True
            lib.comm_abort(comm)
    except nccl_error as e:
        res["init_error"] = getattr(e, "name", type(e).__name__)
        res["init_detail"] = str(e)
    except Exception as e:  # noqa: BLE001
        res["init_other"] = f"{type(e).__name__}: {e}"
    return res


def run_probe(so: Path) -> dict:
    env = dict(os.environ)
    env["EPLB_PYNCCL_NCCL_SO"] = str(so)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--probe"],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(REPO),
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"crash": f"probe hung for more than {PROBE_TIMEOUT_S} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        return {"crash": f"probe process died ({how}) {tail}".strip()}
    return json.loads(lines[-1])


# -- one row ---------------------------------------------------------------------------------


class Row(NamedTuple):
    cells: list[str]
    ok: bool
    notes: list[str]


def check(rel: Release, our_header: str) -> Row:
    from eplb_pynccl._nccl import config

    want = parse_version(rel.version)[:3]
    installed = rel.header.read_text(errors="replace")
    notes: list[str] = []
    ok = True
    res = run_probe(rel.so)

    if "crash" in res:
        loads = f"no: {res['crash']}"
        ok = False
    elif "load_error" in res:
        loads = "no"
        notes.append(f"load: {res['load_error']}")
        ok = False
    else:
        same = os.path.realpath(res["path"]) == os.path.realpath(rel.so)
        loads = "yes" if same else "wrong file"
        if not same:
            notes.append(f"loaded {res['path']} instead of {rel.so}")
            ok = False
        if "public functions not there yet" in res.get("api", ""):
            notes.append(f"load: via {res['api']}")

    got = tuple(res.get("version") or ())
    if not got:
        version_ok = "-"
        ok = False
    elif got == want:
        version_ok = f"yes ({hp.vstr(got)})"
    else:
        version_ok = f"no: {hp.vstr(got)}"
        ok = False
    header_v = hp.header_version(installed)
    if header_v is not None and header_v != want:
        notes.append(f"nccl.h says {hp.vstr(header_v)}")
        ok = False

    if "uid_len" in res:
        n = res["uid_len"]
        uid = f"{n} B" if n is not None else "generated (size unknown)"
        if n != 128:
            ok = False
        if "not there yet" in res.get("uid_api", ""):
            notes.append(f"unique id: via {res['uid_api']}")
    elif "uid_error" in res:
        uid = "no"
        notes.append(f"unique id: {res['uid_error']}")
        ok = False
    else:
        uid = "-"  # the library did not load

    if "init_error" in res:
        init = res["init_error"]
        notes.append(f"init error: {res['init_detail']}")
        if "not there yet" in res.get("init_api", ""):
            init += " (low-level)"
            notes.append(f"init: {res['init_api']}")
            ok = False
    elif res.get("init_created"):
        init = "none: communicator created (a GPU is present?)"
        notes.append(f"init: created through {res.get('init_api')}")
        if "not there yet" in res.get("init_api", ""):
            ok = False
    elif "init_other" in res:
        init = "not an NcclError"
        notes.append(f"init: {res['init_other']}")
        ok = False
    else:
        init = "-"
        ok = False

    problems = hp.compare_header_to_installed(our_header, installed, want)
    header = "agrees" if not problems else f"{len(problems)} disagreement(s)"
    notes += [f"header: {p}" for p in problems]
    ok = ok and not problems

    theirs = hp.installed_config_size(installed)
    mine = config.config_size(want)
    if theirs == mine:
        size = f"{mine} = {theirs}"
    else:
        size = f"{mine} != {theirs}"
        notes.append(f"config size: config.config_size gives {mine}, nccl.h's struct is {theirs}")
        ok = False
    # Equal sizes can hide a missing int in the padding: compare the field lists as well.
    their_fields = [n for n, _ in hp.parse_struct(installed, hp.CONFIG_TYPEDEF) or []]
    my_fields = [f.c_name for f in config.fields_for(want)]
    if my_fields != their_fields:
        size += " (fields differ)"
        notes.append(
            f"config fields: config.fields_for gives {', '.join(my_fields)}; "
            f"nccl.h has {', '.join(their_fields)}"
        )
        ok = False
    cells = [rel.version, loads, version_ok, uid, init, header, size]
    return Row(cells, ok, notes)


HEADERS = ["version", "loads", "version ok", "unique id", "init error", "header", "config size"]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        cells = [c.replace("|", "\\|") for c in r.cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    uname = platform.uname()
    gpu = "no NVIDIA GPU visible" if not Path("/dev/nvidia0").exists() else "NVIDIA GPU present"
    return (
        f"{uname.node} ({uname.system} {uname.release}, {uname.machine}, "
        f"Python {platform.python_version()}, {gpu})"
    )


def report(rows: list[Row], skipped: list[str], args: argparse.Namespace) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "every patch release" if args.all_patches else "the newest patch release of each minor"
    out = [
        "# NCCL ABI matrix",
        "",
        f"Generated by `make test-abi` (`tools/abi_matrix.py`) on {now}.",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Releases: {PACKAGE} wheels from PyPI, {mode}, from 2.{FIRST_MINOR} on. Each row loads "
        "that wheel's `libnccl.so.2` in a fresh interpreter through `EPLB_PYNCCL_NCCL_SO`. "
        "`init error` is the error NCCL gives for a one-rank communicator on this GPU-less "
        "machine (the check is that it is an `NcclError`, not a crash). `header` compares "
        "`csrc_headers/eplb_nccl.h` with the wheel's `nccl.h`; `config size` is "
        "`config.config_size(version)` against sizeof(ncclConfig_t) computed from that `nccl.h` "
        "(the field lists of `config.fields_for(version)` and that struct are compared too).",
        "",
        markdown_table(rows),
        "",
    ]
    fails = [r for r in rows if not r.ok]
    out.append(f"Result: {len(rows) - len(fails)} of {len(rows)} releases pass.")
    out.append("")
    grouped: dict[str, list[str]] = {}  # the same note for several releases is listed once
    for r in rows:
        for n in r.notes:
            grouped.setdefault(n, []).append(r.cells[0])
    if grouped or skipped:
        out.append("## Notes")
        out.append("")
        for s in skipped:
            out.append(f"- {s}")
        for n, versions in grouped.items():
            who = (
                f"all {len(rows)} releases"
                if len(versions) == len(rows) > 1
                else ", ".join(versions)
            )
            out.append(f"- {who}: {n}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="download cache (outside the repo)"
    )
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report to write")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument(
        "--all-patches", action="store_true", help="every patch release, not one per minor"
    )
    ap.add_argument("--only", nargs="+", metavar="VERSION", help="just these wheel versions")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.probe:
        print(json.dumps(probe()), flush=True)
        return 0

    cache = args.cache.expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        ap.error(f"--cache must be outside the repository ({REPO})")
    our_header = OUR_HEADER.read_text()
    releases, skipped = gather(cache, args.all_patches, args.only)
    rows = []
    for rel in releases:
        log(f"[abi] checking {rel.version}")
        rows.append(check(rel, our_header))
    text = report(rows, skipped, args)
    print(markdown_table(rows))
    for s in skipped:
        print(f"note: {s}")
    for r in rows:
        for n in r.notes:
            print(f"{r.cells[0]}: {n}")
    if not args.no_write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}")
    failed = [r.cells[0] for r in rows if not r.ok]
    if not rows:
        print("no release was checked", file=sys.stderr)
        return 1
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} releases pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
