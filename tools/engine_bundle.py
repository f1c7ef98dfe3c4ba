#!/usr/bin/env python
"""Pack an engine's EPLB modules (vLLM's or SGLang's) and what they import into one archive.

The GPU machine has Python 3.12, torch, numpy, NCCL and pytest but no vLLM, no SGLang and no
network; it gets files only inside the repository's ignored paths (``carry``, 64 MiB a call).
This script makes ``build/<engine>-py312.tar.xz`` (``/build/`` is ignored by git; xz because
gzip comes to ~57 MiB for vLLM): one folder ``<engine>-site/`` to put on ``PYTHONPATH``, holding

* the engine's Python sources, copied from an installed engine (``SITE``: the site-packages
  folder holding it, or the virtual environment), without compiled extensions, binaries and
  the C++/CUDA headers and kernel sources it ships (none of which the EPLB modules load; they
  are built for the engine's own torch anyway). ``--sources all`` (vLLM's default) copies the
  whole tree less those; ``--sources imported`` (SGLang's default: SGLang 0.5.23 ships 39 MiB
  of .py files and 51 MiB of kernel configs) copies only the engine's modules that the trace
  below imported (158 files for SGLang: a 12.8 MiB archive) and the ``__init__.py`` of every
  package above them; ``--sources py`` its .py files (SGLang: 21.6 MiB), should a GPU
  machine's run import an engine module that the CPU trace did not;
* every other distribution those modules import, found by running
  ``tools/engine_bundle_check.py --engine <engine>`` (imports + a one-rank update on CPU)
  with SITE's Python and recording ``sys.modules``: each at the version installed in SITE,
  unpacked from its wheel for the target Python (``--python``, default 3.12: cp312 manylinux
  x86_64 wheels, fetched with ``pip download`` into ``build/<engine>-wheels-py312/`` and
  reused from there);
* ``BUNDLE.json``: what went in, from where, and what was left to the target machine.

Left out, because the target machine's own torch install provides them (and its torch and
numpy must be the ones it was built with): torch, numpy, sympy, mpmath, networkx, setuptools,
triton, nvidia-*; also scipy (optional for transformers: imported only where installed), pip,
pytest and its plugins (the target runs its own) and this project. ``--exclude DIST`` leaves
out more.

Usage, on a machine with network and an installed engine (``make`` ``.venv-vllm`` or
``.venv-sglang``)::

    python tools/engine_bundle.py .venv-vllm                 # -> build/vllm-py312.tar.xz, ~4 min
    python tools/engine_bundle.py .venv-vllm --python 3.11   # -> build/vllm-py311.tar.xz
    python tools/engine_bundle.py --engine sglang .venv-sglang  # -> build/sglang-py312.tar.xz

and on the target machine, from the repository root (the archive in ``carry``)::

    python -m tarfile -e build/vllm-py312.tar.xz build      # -> build/vllm-site (or tar -xJf)
    export VLLM_TARGET_DEVICE=cpu PYTHONPATH=$PWD/build/vllm-site:$PWD
    python tools/engine_bundle_check.py --expect-under build/vllm-site

    python -m tarfile -e build/sglang-py312.tar.xz build    # -> build/sglang-site
    export PYTHONPATH=$PWD/build/sglang-site:$PWD
    python tools/engine_bundle_check.py --engine sglang --expect-under build/sglang-site

The wheels' manylinux tags go up to glibc 2.31 (``--glibc``; llguidance 1.9.1 has no older
one), so the target needs glibc >= 2.31.

The archive's size is printed; ``--max-mib`` (default 45) makes the script fail above it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "tools" / "engine_bundle_check.py"
# Per engine: the environment of the trace (on CPU), the one the bundle needs wherever it
# runs (BUNDLE.json's "env") and the default of --sources.
ENGINES = {
    "vllm": {"env": {"VLLM_TARGET_DEVICE": "cpu"}, "target_env": None, "sources": "all"},
    "sglang": {"env": {"SGLANG_USE_CPU_ENGINE": "1"}, "target_env": {}, "sources": "imported"},
}

# Distributions the target machine already has with its torch and test tools (normalized names).
PROVIDED = {
    "torch",
    "numpy",
    "sympy",
    "mpmath",
    "networkx",
    "setuptools",
    "triton",
    "scipy",
    "pip",
    "eplb-pynccl",
    # the target's test tools (this repository's check and tests import them)
    "pytest",
    "pluggy",
    "iniconfig",
    "hypothesis",
}
PROVIDED_PREFIXES = ("nvidia-",)
# Never needed from vLLM's own tree: compiled code and the sources of kernels built at run time.
SKIP_SUFFIXES = (".so", ".pyc", ".pyo", ".h", ".hpp", ".hxx", ".cuh", ".cu", ".c", ".cc", ".cpp")
SKIP_SUFFIXES += (".inl",)


def platforms(glibc: str) -> list[str]:
    """pip's --platform tags for x86_64 Linux with glibc ``glibc`` (e.g. "2.31") and older."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_site(path: Path, engine: str) -> Path:
    """SITE itself when it holds the engine's package, else the site-packages of the
    environment at SITE."""
    path = path.resolve()
    if (path / engine / "__init__.py").is_file():
        return path
    hits = sorted(path.glob("lib/python3*/site-packages"))
    for h in hits:
        if (h / engine / "__init__.py").is_file():
            return h
    sys.exit(f"no installed {engine} under {path}")


def site_python(site: Path) -> Path:
    """The interpreter of the environment that ``site`` belongs to."""
    for cand in (site.parent.parent.parent / "bin" / "python", site.parent.parent / "bin/python"):
        if cand.exists():
            return cand
    sys.exit(f"no bin/python for {site}")


def trace(py: Path, site: Path, engine: str) -> tuple[dict, dict]:
    """Run the check script with SITE's python: {top-level name: [files]} of what it imported
    from SITE, and {normalized dist: (name, version, [top-level names])} of SITE."""
    env = dict(os.environ, **ENGINES[engine]["env"], PYTHONNOUSERSITE="1")
    env["PYTHONPATH"] = str(REPO)  # this project (the sglang check imports it), never bundled
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "modules.json"
        r = subprocess.run(
            [
                str(py),
                str(CHECK),
                "--engine",
                engine,
                "--device",
                "cpu",
                "--dump-modules",
                str(dump),
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        if r.returncode != 0:
            sys.exit(f"tracing failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        modules = json.loads(dump.read_text())
    tops: dict[str, list[str]] = {}
    for f in modules.values():
        p = Path(f)
        try:
            rel = p.resolve().relative_to(site)
        except ValueError:
            continue
        top = rel.parts[0]
        if len(rel.parts) == 1:  # a single-file module or extension: name.py, name.cpython-...so
            top = top.split(".")[0]
        tops.setdefault(top, []).append(str(rel))
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for top, dists in m.packages_distributions().items():\n"
        "    for d in dists: out.setdefault(d, []).append(top)\n"
        "print(json.dumps({d: (m.version(d), t) for d, t in out.items()}))\n"
    )
    r = subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, check=True)
    dists = {norm(d): (d, v, t) for d, (v, t) in json.loads(r.stdout).items()}
    return tops, dists


def needed(tops: dict, dists: dict, exclude: set, engine: str) -> tuple[dict, list, list]:
    """{normalized dist: (name, version)} to bundle (the engine excluded: copied from SITE), the
    dists left to the target machine, and imported top-level names of no distribution."""
    by_top: dict[str, list[str]] = {}
    for nd, (_, _, t) in dists.items():
        for top in t:
            by_top.setdefault(top, []).append(nd)
    want, left, orphans = {}, set(), []
    for top in sorted(tops):
        owners = by_top.get(top)
        if not owners:
            orphans.append(top)
            continue
        for nd in owners:
            if nd in PROVIDED or nd in exclude or nd.startswith(PROVIDED_PREFIXES):
                left.add(nd)
            elif nd != engine:
                want[nd] = dists[nd][:2]
    return want, sorted(left), orphans


def download(want: dict, pyver: str, glibc: str, wheels: Path) -> dict:
    """cp<pyver> wheels of ``want`` in ``wheels`` (pip download, reusing what is there)."""
    wheels.mkdir(parents=True, exist_ok=True)
    reqs = [f"{name}=={ver}" for name, ver in want.values()]
    plat = [a for p in platforms(glibc) for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", pyver, *plat, "-d", str(wheels), *reqs]
    print("pip download:", len(reqs), "wheels for Python", pyver, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if not ln.startswith("WARNING: Location")]
        sys.exit("pip download failed:\n" + "\n".join(err[-20:]))
    found = {}
    for whl in wheels.glob("*.whl"):
        name, ver = whl.name.split("-")[:2]
        found.setdefault((norm(name), ver), []).append(whl)
    out = {}
    tag = f"cp{pyver.replace('.', '')}"
    for nd, (name, ver) in want.items():
        hits = found.get((nd, ver)) or found.get((nd, ver.replace("-", "_")))
        if not hits:
            sys.exit(f"no wheel for {name}=={ver} in {wheels}")
        ok = [h for h in hits if "-py3-none-" in h.name or "-py2.py3-" in h.name or tag in h.name]
        ok += [h for h in hits if "abi3" in h.name and h not in ok]
        if not ok:
            sys.exit(f"no wheel of {name}=={ver} for {tag}: {[h.name for h in hits]}")
        out[nd] = ok[0]
    return out


def _wheel_member(name: str) -> str | None:
    """Where a wheel member goes under the bundle root (None: leave it out)."""
    parts = name.split("/")
    if "__pycache__" in parts or name.endswith((".pyc", "/")):
        return None
    if parts[0].endswith(".data"):  # only purelib/platlib of a wheel's .data are importable
        if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
            return "/".join(parts[2:])
        return None
    return name


def engine_files(site: Path, engine: str, sources: str, imported: list[str]) -> list[Path]:
    """The engine's files to copy from SITE, and its dist-info: with ``sources`` "all" its
    whole tree, "py" its .py files, "imported" the ``imported`` files (paths relative to SITE)
    and the ``__init__.py`` of every package above them; less __pycache__, symlinks and
    SKIP_SUFFIXES."""
    files: set[Path] = set()
    roots = sorted(site.glob(f"{engine}-*.dist-info"))
    for root in roots + ([site / engine] if sources != "imported" else []):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            tree = sources == "all" or root in roots
            files.update(Path(dirpath) / fn for fn in filenames if tree or fn.endswith(".py"))
    for rel in imported if sources == "imported" else []:
        p = site / rel
        if p.is_file():
            files.add(p)
        for parent in (p if p.is_dir() else p.parent, *p.parents):
            if parent == site:
                break
            if (parent / "__init__.py").is_file():
                files.add(parent / "__init__.py")
    return sorted(
        p
        for p in files
        if not (p.name.endswith(SKIP_SUFFIXES) or ".so." in p.name or p.is_symlink())
    )


def build(
    site: Path, engine_paths: list[Path], wheel_files: dict, out: Path, manifest: dict, root: str
) -> dict:
    """Write the archive (every entry under ``root/``); returns {top-level entry: bytes
    uncompressed}."""
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if out.name.endswith(".tar.gz"):
        opened = tarfile.open(tmp, "w:gz", compresslevel=9)
    elif out.name.endswith(".tar.xz"):
        opened = tarfile.open(tmp, "w:xz", preset=9)
    else:
        sys.exit(f"--out must end in .tar.xz or .tar.gz: {out}")
    with opened as tar:

        def add_bytes(arc: str, data: bytes, mode: int = 0o644) -> None:
            if arc in seen:
                return
            seen.add(arc)
            info = tarfile.TarInfo(f"{root}/{arc}")
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
            top = arc.split("/")[0]
            sizes[top] = sizes.get(top, 0) + len(data)

        # The engine from SITE: sources and data files only.
        for p in engine_paths:
            data = p.read_bytes()
            if data[:4] == b"\x7fELF":  # vllm-rs and any other binary
                continue
            add_bytes(str(p.relative_to(site)), data, 0o755 if os.access(p, os.X_OK) else 0o644)
        # Every other distribution from its wheel, whole.
        for _nd, whl in sorted(wheel_files.items()):
            with zipfile.ZipFile(whl) as z:
                for info in z.infolist():
                    arc = _wheel_member(info.filename)
                    if arc is None:
                        continue
                    mode = (info.external_attr >> 16) & 0o777 or 0o644
                    add_bytes(arc, z.read(info), mode)
        add_bytes("BUNDLE.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    tmp.replace(out)
    return sizes


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("site", type=Path, help="site-packages (or virtual environment) with it")
    ap.add_argument("--engine", choices=sorted(ENGINES), default="vllm")
    ap.add_argument(
        "--sources",
        choices=("all", "py", "imported"),
        help="the engine's files: its whole tree, its .py files, or the modules the trace "
        "imported (default: vllm all, sglang imported)",
    )
    ap.add_argument("--python", default="3.12", help="target Python (wheels' tag), e.g. 3.12")
    ap.add_argument("--out", type=Path, help="default build/ENGINE-py<XY>.tar.xz (.tar.gz: gzip)")
    ap.add_argument("--wheels", type=Path, help="wheel cache, default build/ENGINE-wheels-py<XY>")
    ap.add_argument(
        "--glibc", default="2.31", help="newest glibc of the wheels' manylinux tags (2.31)"
    )
    ap.add_argument("--exclude", action="append", default=[], metavar="DIST")
    ap.add_argument("--max-mib", type=float, default=45.0)
    return ap


def _report(out: Path, sizes: dict[str, int], max_mib: float) -> int:
    """Print the largest entries and the archive's size; 1 where it is over ``max_mib``."""
    size = out.stat().st_size
    total = sum(sizes.values())
    print(f"largest entries (uncompressed, of {total / 2**20:.0f} MiB):")
    for top, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {n / 2**20:7.1f} MiB  {top}")
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    if size > max_mib * 2**20:
        print(f"FAIL: larger than --max-mib {max_mib}")
        return 1
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    engine, xy = args.engine, args.python.replace(".", "")
    spec = ENGINES[engine]
    out = args.out or REPO / "build" / f"{engine}-py{xy}.tar.xz"
    wheels = args.wheels or REPO / "build" / f"{engine}-wheels-py{xy}"
    sources = args.sources or spec["sources"]

    site = find_site(args.site, engine)
    py = site_python(site)
    print(f"tracing imports with {py} ...", flush=True)
    tops, dists = trace(py, site, engine)
    if engine not in tops:
        sys.exit(f"the trace imported no {engine} from SITE")
    want, left, orphans = needed(tops, dists, {norm(e) for e in args.exclude}, engine)
    paths = engine_files(site, engine, sources, tops[engine])
    print(
        f"imported from SITE: {len(tops)} top-level names; bundling {engine} ({sources}: "
        f"{len(paths)} files) + {len(want)} dists"
    )
    print("left to the target machine:", ", ".join(left) or "-")
    if orphans:
        print("imported, of no distribution (not bundled):", ", ".join(orphans))
    wheel_files = download(want, args.python, args.glibc, wheels)
    manifest = {
        "python": args.python,
        "glibc_at_least": args.glibc,
        engine: dists[engine][1],
        f"{engine}_from": str(site),
        f"{engine}_sources": sources,
        "dists": {name: ver for name, ver in sorted(want.values())},
        "wheels": sorted(w.name for w in wheel_files.values()),
        "left_to_target": left,
        "env": spec["env"] if spec["target_env"] is None else spec["target_env"],
    }
    sizes = build(site, paths, wheel_files, out, manifest, f"{engine}-site")
    return _report(out, sizes, args.max_mib)


if __name__ == "__main__":
    sys.exit(main())
