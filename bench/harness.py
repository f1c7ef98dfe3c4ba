"""Process harness for the benchmarks: spawning ranks, the per-rank context, timing statistics.

How a run goes
--------------
The parent (``python -m bench.run``) hosts a TCPStore (it outlives any child that crashes) and
spawns one process per rank with the ``spawn`` start method. Each child:

1. sets ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``
   where unset, then ``torch.cuda.set_device(rank)`` on GPU;
2. joins torch.distributed (``nccl`` on GPU, ``gloo`` on CPU) through the parent's store;
3. builds the communicators that can be built (eplb_pynccl via ``Communicator.from_store``,
   ``cupy.cuda.nccl.NcclCommunicator``, nccl4py's ``nccl.core.Communicator``); one that cannot be
   built is recorded in ``ctx.bindings`` with the reason and left ``None``;
4. runs the selected child parts in order. A part is ``fn(ctx) -> list[dict]``; every rank calls
   it, and the rows of rank 0 are the part's result (parts reduce across ranks themselves, e.g.
   with :meth:`BenchContext.allgather`). After a part, the ranks exchange their status through the
   store, so all of them agree whether it succeeded; rank 0's rows land in ``ctx.results[part]`` on
   every rank (later parts read them, e.g. eplb reads ``ctx.results['alltoall']``).

Failure handling: an exception in a part is sent to the parent with the rank and traceback, and the
ranks go on to the next part if they all got through the status exchange. A rank that waits longer
than ``--stall-timeout`` for its peers there (they are stuck in NCCL, say) reports that and exits;
the parent kills the remaining children once nothing has progressed for ``--stall-timeout`` after an
error, and always at ``--timeout``. Any error makes ``bench.run`` exit non-zero.

Writing a part
--------------
Register it in ``bench/run.py`` (one ``part(...)`` line; or pass ``--parts module:function``). Raise :class:`PartSkipped`
(on every rank alike) when the part does not apply (e.g. it needs GPUs). Rows are flat dicts; the
harness adds ``'part'`` when missing. See ``bench/report.py`` for the row schema.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import math
import os
import pickle
import queue as _queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CHILD_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


class PartSkipped(Exception):
    """Raised by a part (on every rank alike) when it does not apply; the message says why."""


class PeerFailed(BaseException):
    """A store exchange was abandoned because another rank failed (or the parent aborted).

    A BaseException, so a part's ``except Exception`` does not swallow it."""


ABORT_ALL = "bench/abort/all"
EXIT_GRACE_S = 120.0  # after the last part, ranks get this long to close their communicators
DEATH_GRACE_S = 2.0  # after a rank died, its peers get this long before they are killed


def _exit_code(code: int) -> str:
    """'exit code 3', or the signal that killed the process (negative codes)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    why = " (the kernel's out-of-memory killer sends it)" if -code == signal.SIGKILL else ""
    return f"exit code {code}: killed by {name}{why}"


class PartUnavailable(Exception):
    """The module that implements a part is not there (yet); the part is skipped."""


@dataclass(frozen=True)
class PartSpec:
    name: str
    target: str  # "module:function"
    where: str  # "child": runs on every rank; "parent": runs once in the parent (CPU)
    needs_gpu: bool
    description: str
    hidden: bool = False


def custom_part(name: str) -> PartSpec:
    """An ad hoc child part named ``module:function`` (``--parts module:function``)."""
    return PartSpec(name, name, "child", False, f"custom part {name}")


def resolve_part(spec: PartSpec) -> Callable[..., Any]:
    """Import the part's function. Raises PartUnavailable when its module does not exist."""
    mod_name, _, fn_name = spec.target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        # Only the part's own module (or a package above it) missing means "not written yet";
        # a missing dependency inside it is a real error.
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise PartUnavailable(f"{mod_name.replace('.', '/')}.py is not present") from None
        # A module it imports is missing (e.g. a part of eplb_pynccl not written yet): skip too,
        # but say which one, so a run that lacks it on purpose and one that lacks it by mistake
        # both show it.
        raise PartUnavailable(
            f"{mod_name} needs module {e.name!r}, which is not importable"
        ) from None
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise PartUnavailable(f"{mod_name} has no function {fn_name}")
    return fn


def normalize_rows(rows: Any, part: str) -> list[dict]:
    """Rows as a list of flat dicts with a 'part' key (plain Python scalars where possible)."""
    if rows is None:
        return []
    if isinstance(rows, dict):
        rows = [rows]
    out = []
    for r in rows:
        if not isinstance(r, dict):
            raise TypeError(f"part {part} returned a row of type {type(r).__name__}, expected dict")
        d = {"part": part}
        for k, v in r.items():
            d[str(k)] = plain(v)
        d["part"] = r.get("part", part)
        out.append(d)
    return out


def plain(v: Any) -> Any:
    """numpy/torch scalars to Python scalars; other non-JSON values to str."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError, TypeError):
            pass
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return str(v)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def sig(x: float, digits: int = 4) -> float:
    """x rounded to ``digits`` significant digits (keeps tiny values: 0.009 GB/s stays 0.009)."""
    if x == 0 or x != x or x in (float("inf"), float("-inf")):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        return math.nan
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def median(xs: Sequence[float]) -> float:
    return percentile(xs, 50.0)


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """n, median, mean, min, max, p10, p90 of a sample."""
    if not xs:
        return {
            "n": 0,
            "median": math.nan,
            "mean": math.nan,
            "min": math.nan,
            "max": math.nan,
            "p10": math.nan,
            "p90": math.nan,
        }
    return {
        "n": len(xs),
        "median": median(xs),
        "mean": sum(xs) / len(xs),
        "min": float(min(xs)),
        "max": float(max(xs)),
        "p10": percentile(xs, 10.0),
        "p90": percentile(xs, 90.0),
    }


def size_series(min_bytes: int, max_bytes: int, factor: int = 4) -> list[int]:
    """min, min*f, min*f^2, ... <= max; max itself is appended when the series misses it."""
    if min_bytes <= 0 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"bad size range {min_bytes}..{max_bytes} x{factor}")
    out = []
    s = min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= factor
    if out[-1] != max_bytes:
        out.append(max_bytes)
    return out


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
}


def parse_bytes(text: str | int) -> int:
    """'8', '4K', '4KiB', '1G' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (use e.g. 8, 4K, 16M, 1G)")
    return int(float(num) * _UNITS[unit])


class HostTimer:
    """perf_counter-based repeat timer (CPU mode and host-overhead measurements)."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def __enter__(self) -> HostTimer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.samples.append(time.perf_counter() - self._t0)


# --------------------------------------------------------------------------------------------
# The per-rank context
# --------------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What a part receives on every rank.

    rank, world_size: this process's rank and the number of ranks.
    device:      torch.device ('cuda:<rank>' on GPU, 'cpu' in CPU mode).
    is_gpu:      False in CPU mode (gloo process group, no NCCL communicators).
    store:       the run's torch TCPStore (client); use keys under your part's name.
    pg:          the torch.distributed default process group (nccl on GPU, gloo on CPU).
    comm:        eplb_pynccl.Communicator, or None (see ``bindings['eplb_pynccl']`` for why).
    cupy_comm:   cupy.cuda.nccl.NcclCommunicator, or None.
    args:        the parsed CLI arguments (argparse.Namespace), incl. the eplb pass-through flags.
    results:     part name -> rows (rank 0's, identical on every rank) of the parts that already
                 ran successfully in this invocation.
    nccl4py_comm: nccl.core.Communicator, or None.
    bindings:    binding name -> 'ok' or the reason it is unavailable
                 (keys: eplb_pynccl, torch, cupy, nccl4py).
    stall_timeout: seconds a store wait may take before the peers count as stuck.
    """

    rank: int
    world_size: int
    device: Any
    is_gpu: bool
    store: Any
    pg: Any
    comm: Any
    cupy_comm: Any
    args: argparse.Namespace
    results: dict[str, list[dict]] = field(default_factory=dict)
    nccl4py_comm: Any = None
    bindings: dict[str, str] = field(default_factory=dict)
    stall_timeout: float = 300.0
    _seq: int = 0
    _ns: str = "init"
    _abort_keys: tuple[str, ...] = (ABORT_ALL,)

    # -- store-based collectives (backend-independent, for host-side values) -----------------
    def _next(self, what: str) -> str:
        self._seq += 1
        return f"bench/{self._ns}/{what}/{self._seq}"

    def _enter(self, ns: str) -> None:
        """Start a fresh key namespace (each part gets one, so a rank that left a part early
        cannot pair its next exchange with a peer's exchange of the old part)."""
        self._ns, self._seq = ns, 0
        self._abort_keys = (ABORT_ALL, f"bench/abort/{ns}")

    def _wait(self, keys: list[str], abort_keys: Sequence[str] | None = None) -> None:
        """Poll until ``keys`` exist. Raises PeerFailed when a peer (or the parent) set an abort
        key, TimeoutError after ``stall_timeout``. Polls with check() rather than wait() so a
        slow peer does not make torch log a socket timeout every time."""
        store = self.store
        if store.check(keys):
            return
        abort = self._abort_keys if abort_keys is None else tuple(abort_keys)
        deadline = time.monotonic() + self.stall_timeout
        delay = 0.0
        while not store.check(keys):
            if delay >= 1e-3:
                for k in abort:
                    if store.check([k]):
                        raise PeerFailed(store.get(k).decode(errors="replace"))
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rank {self.rank}: peers did not arrive within "
                        f"{self.stall_timeout:.0f} s (keys {keys[:4]})"
                    )
                time.sleep(delay)
            delay = min(0.02, delay * 2 if delay else 1e-5)

    def barrier(self) -> None:
        """Host barrier through the store (does not touch any communicator or stream)."""
        key = self._next("barrier")
        if self.store.add(key, 1) == self.world_size:
            self.store.set(key + "/done", b"1")
        self._wait([key + "/done"])

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, indexed by rank."""
        key = self._next("allgather")
        self.store.set(f"{key}/{self.rank}", pickle.dumps(obj))
        keys = [f"{key}/{r}" for r in range(self.world_size)]
        self._wait(keys)
        return [pickle.loads(self.store.get(k)) for k in keys]

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        key = self._next("broadcast")
        if self.rank == src:
            self.store.set(key, pickle.dumps(obj))
            return obj
        self._wait([key])
        return pickle.loads(self.store.get(key))

    # -- device helpers -------------------------------------------------------------------------
    def sync(self) -> None:
        if self.is_gpu:
            import torch

            torch.cuda.synchronize(self.device)

    def stream_handle(self) -> int:
        """The torch current stream of this rank's device as an int (cudaStream_t)."""
        import torch

        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def log(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.rank == 0:
            print(f"[rank {self.rank}] {msg}", flush=True)

    def available(self, binding: str) -> bool:
        return self.bindings.get(binding) == "ok"


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------


def _send(q: Any, *msg: Any) -> None:
    try:
        q.put(msg)
    except Exception:  # a message that cannot be pickled must not kill the rank
        q.put(tuple(m if isinstance(m, (str, int, float, type(None))) else repr(m) for m in msg))


def _maybe_inject_fault(args: argparse.Namespace, rank: int, part: str) -> None:
    """--inject-fault RANK:PART:KIND (hidden; for testing the harness). KIND: raise|hang|exit|skip."""
    spec = getattr(args, "inject_fault", None)
    if not spec:
        return
    for item in spec.split(","):
        r, p, kind = (item.split(":") + ["raise"])[:3]
        if p != part or (r not in ("*", "all") and int(r) != rank):
            continue
        if kind == "raise":
            raise RuntimeError(f"injected fault on rank {rank} in part {part}")
        if kind == "skip":
            raise PartSkipped("injected skip")
        if kind == "hang":
            time.sleep(10**6)
        if kind == "exit":
            os._exit(17)


def _uid_exchange(
    store: Any, key: str, rank: int, make: Callable[[], bytes], timeout: float
) -> bytes:
    if rank == 0:
        raw = make()
        store.set(key, raw)
        return raw
    store.wait([key], _dt.timedelta(seconds=timeout))
    return store.get(key)


def _init_bindings(ctx: BenchContext) -> None:
    """Build the eplb_pynccl, cupy and nccl4py communicators that can be built (GPU mode)."""
    import torch

    ctx.bindings["torch"] = "ok" if ctx.pg is not None else "no process group"
    if not ctx.is_gpu:
        for b in ("eplb_pynccl", "cupy", "nccl4py"):
            ctx.bindings[b] = "CPU mode (needs GPUs)"
        return
    to = ctx.stall_timeout
    n, r = ctx.world_size, ctx.rank

    try:
        import eplb_pynccl as ep

        ctx.comm = ep.Communicator.from_store(
            ctx.store, r, n, device=ctx.device.index, key="bench/eplb_pynccl"
        )
        ctx.bindings["eplb_pynccl"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, the bench goes on without it
        ctx.bindings["eplb_pynccl"] = f"{type(e).__name__}: {e}"

    try:
        import cupy
        from cupy.cuda import nccl as cnccl

        def make_cupy_uid() -> bytes:
            uid = cnccl.get_unique_id()
            return pickle.dumps(uid)  # bytes in cupy >= 13, a tuple of ints before

        uid = pickle.loads(_uid_exchange(ctx.store, "bench/cupy_uid", r, make_cupy_uid, to))
        with cupy.cuda.Device(ctx.device.index):
            ctx.cupy_comm = cnccl.NcclCommunicator(n, uid, r)
        ctx.bindings["cupy"] = "ok"
    except Exception as e:  # noqa: BLE001
        ctx.bindings["cupy"] = f"{type(e).__name__}: {e}"

    try:
        import nccl.core as n4

        def make_n4_uid() -> bytes:
            uid = n4.get_unique_id()
            raw = uid.as_bytes
            return bytes(raw() if callable(raw) else raw)

        raw = _uid_exchange(ctx.store, "bench/nccl4py_uid", r, make_n4_uid, to)
        torch.cuda.set_device(ctx.device)
        ctx.nccl4py_comm = n4.Communicator.init(n, r, n4.UniqueId.from_bytes(raw))
        ctx.bindings["nccl4py"] = "ok"
    except Exception as e:  # noqa: BLE001
        ctx.bindings["nccl4py"] = f"{type(e).__name__}: {e}"


def collect_child_meta(ctx: BenchContext) -> dict[str, Any]:
    """Versions and devices as seen by rank 0 (GPU names, NCCL versions of each binding)."""
    import torch

    meta: dict[str, Any] = {
        "world_size": ctx.world_size,
        "mode": "gpu" if ctx.is_gpu else "cpu",
        "bindings": dict(ctx.bindings),
        "nccl_versions": {},
    }
    nv = meta["nccl_versions"]
    if ctx.is_gpu:
        meta["gpu_count_visible"] = torch.cuda.device_count()
        meta["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(ctx.world_size)]
        meta["cuda_runtime"] = torch.version.cuda
        try:
            nv["torch"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            nv["torch"] = f"? ({e})"
    try:
        import eplb_pynccl as ep

        nv["eplb_pynccl"] = ".".join(map(str, ep.nccl_version()))
    except Exception as e:  # noqa: BLE001
        nv["eplb_pynccl"] = f"? ({type(e).__name__})"
    if ctx.cupy_comm is not None:
        try:
            from cupy.cuda import nccl as cnccl

            v = int(cnccl.get_version())
            nv["cupy"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
        except Exception as e:  # noqa: BLE001
            nv["cupy"] = f"? ({e})"
    if ctx.nccl4py_comm is not None:
        try:
            import nccl

            nv["nccl4py"] = str(nccl.get_version())
        except Exception as e:  # noqa: BLE001
            nv["nccl4py"] = f"? ({e})"
    return meta


def _close_bindings(ctx: BenchContext) -> None:
    for what, fn in (
        ("nccl4py", lambda: ctx.nccl4py_comm and ctx.nccl4py_comm.destroy()),
        ("cupy", lambda: ctx.cupy_comm and ctx.cupy_comm.destroy()),
        ("eplb_pynccl", lambda: ctx.comm and ctx.comm.close()),
    ):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            print(
                f"[rank {ctx.rank}] closing {what}: {type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        print(f"[rank {ctx.rank}] destroy_process_group: {e}", file=sys.stderr, flush=True)


def _child_entry(rank: int, world_size: int, spec: dict[str, Any], q: Any) -> None:
    """Entry point of a spawned rank. Always ends in os._exit after flushing the queue."""
    try:
        ctx = _child_setup(rank, world_size, spec, q)
    except BaseException:  # noqa: BLE001
        _send(q, "init_error", rank, traceback.format_exc())
        _finish(q, rank, 2)
        return
    code = 0
    for idx, pspec in enumerate(spec["parts"]):
        name = pspec.name
        status, reason, rows, secs = _run_part(ctx, q, idx, pspec)
        if status == "error":
            code = 1
        everyone = _share_outcome(ctx, q, idx, name, status, reason, rows)
        if everyone is None:
            _finish(q, rank, 3)
            return
        agreed, reason = _agreed_outcome(everyone, world_size)
        if agreed == "ok":
            ctx.results[name] = everyone[0][2] or []
        if rank == 0:
            _send(
                q,
                "part_done",
                rank,
                name,
                agreed,
                reason,
                everyone[0][2] if agreed == "ok" else None,
                secs,
            )
    try:
        _close_bindings(ctx)
    except BaseException:  # noqa: BLE001
        pass
    _finish(q, rank, code)


def _child_setup(rank: int, world_size: int, spec: dict[str, Any], q: Any) -> BenchContext:
    """A spawned rank's context: environment, torch's seed, threads and device, the store, the
    process group, the bindings (one usable on every rank, or marked unavailable where a peer
    lacks it); rank 0 sends the run's meta."""
    _die_with_parent()
    for k, v in CHILD_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    args: argparse.Namespace = spec["args"]
    is_gpu: bool = spec["is_gpu"]
    stall = float(spec["stall_timeout"])
    import torch
    import torch.distributed as dist

    torch.manual_seed(int(getattr(args, "seed", 0)) + rank)
    if is_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
        device = torch.device("cpu")
    td = _dt.timedelta(seconds=stall)
    store = dist.TCPStore(spec["host"], spec["port"], is_master=False, timeout=td)
    kw: dict[str, Any] = {"device_id": device} if is_gpu else {}
    dist.init_process_group(
        "nccl" if is_gpu else "gloo",
        store=dist.PrefixStore("torch_pg", store),
        rank=rank,
        world_size=world_size,
        timeout=td,
        **kw,
    )
    ctx = BenchContext(
        rank=rank,
        world_size=world_size,
        device=device,
        is_gpu=is_gpu,
        store=store,
        pg=dist.group.WORLD,
        comm=None,
        cupy_comm=None,
        args=args,
        stall_timeout=stall,
    )
    _init_bindings(ctx)
    # A binding must be usable on every rank, or a part using it would wait forever.
    everyone = ctx.allgather(ctx.bindings)
    for name in list(ctx.bindings):
        bad = [(r, b.get(name, "missing")) for r, b in enumerate(everyone) if b.get(name) != "ok"]
        if bad and ctx.bindings[name] == "ok":
            ctx.bindings[name] = f"unavailable on rank {bad[0][0]}: {bad[0][1]}"
    meta = collect_child_meta(ctx)
    if any(b != everyone[0] for b in everyone):
        meta["bindings_by_rank"] = {str(r): b for r, b in enumerate(everyone)}
    if rank == 0:
        _send(q, "meta", rank, meta)
    return ctx


def _run_part(ctx: BenchContext, q: Any, idx: int, pspec: Any) -> tuple[str, str, Any, float]:
    """Part ``idx`` on this rank: (status, reason, rows, seconds); a failure is reported to
    the parent and its peers are told to give up waiting for this rank."""
    rank, name = ctx.rank, pspec.name
    ctx._enter(f"p{idx}")
    _send(q, "part_start", rank, name)
    t0 = time.perf_counter()
    status, reason, rows = "ok", "", None
    try:
        _maybe_inject_fault(ctx.args, rank, name)
        fn = resolve_part(pspec)
        rows = normalize_rows(fn(ctx), name)
    except (PartSkipped, PartUnavailable) as e:
        status, reason = "skipped", str(e)
        _abort_part(ctx, f"rank {rank} skipped {name}: {reason}")  # in case a peer did not
    except PeerFailed as e:  # not the cause: the failing rank reports that
        status, reason = "error", f"abandoned ({e})"
    except BaseException as e:  # noqa: BLE001
        status, reason = "error", f"{type(e).__name__}: {e}"
        _send(q, "part_error", rank, name, traceback.format_exc())
        _abort_part(ctx, f"rank {rank} failed in {name}: {reason}")
    return status, reason, rows, time.perf_counter() - t0


def _share_outcome(ctx: BenchContext, q: Any, idx: int, name: str, status, reason, rows):
    """Every rank's (status, reason, rows: rank 0's only) of part ``idx``, exchanged under
    its own keys (so it pairs up whatever the part left unpaired); None after reporting a
    fatal error (a peer failed, or did not answer within the stall timeout)."""
    rank = ctx.rank
    try:
        keys = [f"bench/status/{idx}/{r}" for r in range(ctx.world_size)]
        ctx.store.set(keys[rank], pickle.dumps((status, reason, rows if rank == 0 else None)))
        ctx._wait(keys, abort_keys=(ABORT_ALL,))
        return [pickle.loads(ctx.store.get(k)) for k in keys]
    except PeerFailed as e:
        _send(q, "fatal", rank, f"rank {rank}: run aborted after part {name!r}: {e}")
    except BaseException:  # noqa: BLE001
        _send(
            q,
            "fatal",
            rank,
            f"rank {rank} waited more than {ctx.stall_timeout:.0f} s for its peers after part "
            f"{name!r} (its own status: {status}); the peers are probably stuck.\n"
            + traceback.format_exc(),
        )
    return None


def _agreed_outcome(everyone: list, world_size: int) -> tuple[str, str]:
    """The part's status and reason from every rank's (status, reason, rows): an error where
    a rank failed (not merely abandoned) or only some ranks skipped, skipped where all did."""
    statuses = [e[0] for e in everyone]
    real = [
        r for r, e in enumerate(everyone) if e[0] == "error" and not e[1].startswith("abandoned")
    ]
    skipped = [r for r, st in enumerate(statuses) if st == "skipped"]
    if real:
        return "error", f"failed on rank(s) {real}: " + "; ".join(
            dict.fromkeys(everyone[r][1] for r in real)
        )
    if skipped and len(skipped) < world_size:
        return "error", f"skipped on rank(s) {skipped} only: " + "; ".join(
            dict.fromkeys(everyone[r][1] for r in skipped)
        )
    if skipped:
        return "skipped", everyone[0][1]
    if "error" in statuses:
        return "error", everyone[statuses.index("error")][1]
    return "ok", ""


def _abort_part(ctx: BenchContext, why: str) -> None:
    """Tell peers waiting in a store exchange of the current part to give up at once."""
    try:
        ctx.store.set(f"bench/abort/{ctx._ns}", why[:500])
    except Exception:  # noqa: BLE001
        pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies, so no rank outlives the bench."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _finish(q: Any, rank: int, code: int) -> None:
    _send(q, "exit", rank, code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        q.close()
        q.join_thread()
    finally:
        os._exit(code)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


@dataclass
class PartOutcome:
    name: str
    status: str = "not run"  # ok | error | skipped | not run
    reason: str = ""
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    errors: dict[int, str] = field(default_factory=dict)  # rank -> traceback

    def as_meta(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 3)}
        if self.reason:
            d["reason"] = self.reason
        if self.errors:
            d["errors"] = {str(k): v for k, v in self.errors.items()}
        return d


@dataclass
class ChildRun:
    outcomes: dict[str, PartOutcome]
    meta: dict[str, Any]
    failures: list[str]  # run-level problems (init errors, deaths, timeouts)
    interrupted: bool = False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no socket holds now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(
    parts: list[PartSpec],
    args: argparse.Namespace,
    nprocs: int,
    is_gpu: bool,
    on_part_done: Callable[[PartOutcome], None] | None = None,
    log: Callable[[str], None] = print,
) -> ChildRun:
    """Spawn ``nprocs`` ranks, run ``parts`` on them, collect outcomes. Never hangs past --timeout."""
    sup = _Supervisor(parts, args, nprocs, is_gpu, on_part_done, log)
    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        sup.watch()
    except KeyboardInterrupt as e:
        sup.fail(f"interrupted ({e or 'Ctrl-C'}); ranks killed")
        sup.kill_alive()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        sup.close()
    return sup.result()


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Supervisor:
    """The parent's side of a child run: the store, the ranks, their messages and limits."""

    def __init__(self, parts, args, nprocs, is_gpu, on_part_done, log) -> None:
        import multiprocessing as mp

        import torch.distributed as dist

        for k, v in CHILD_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)  # inherited by the spawned children
        self.parts = [p.name for p in parts]
        self.args, self.on_part_done, self.log = args, on_part_done, log
        self.stall = stall = float(args.stall_timeout)
        port = int(getattr(args, "master_port", 0) or 0) or free_port()
        self.store = dist.TCPStore(
            "127.0.0.1",
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=_dt.timedelta(seconds=stall),
        )
        spec = {
            "host": "127.0.0.1",
            "port": self.store.port,
            "parts": list(parts),
            "args": args,
            "is_gpu": is_gpu,
            "stall_timeout": stall,
        }
        mpc = mp.get_context("spawn")
        self.q = mpc.Queue()
        self.procs = [
            mpc.Process(
                target=_child_entry,
                args=(r, nprocs, spec, self.q),
                name=f"bench-rank{r}",
                daemon=False,
            )
            for r in range(nprocs)
        ]
        self.outcomes = {p: PartOutcome(p) for p in self.parts}
        self.meta: dict[str, Any] = {}
        self.failures: list[str] = []
        self.current: dict[int, str] = {}
        self.exited: dict[int, int] = {}
        self.deadline = time.monotonic() + float(args.timeout)
        self.kill_at: float | None = None  # set after an error: nothing progressed since
        self.exit_by: float | None = None  # set when the last part is done
        self.death = ""  # the first rank that died, when one did
        for p in self.procs:
            p.start()

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.log(f"!! {what}")

    def trouble(self, now: float, fatal: str = "") -> None:
        """An error: kill whatever has not progressed in stall+15 s. A fatal one (a rank is gone
        or gave up) also tells the ranks to abandon their store waits, and kills in 20 s."""
        if self.kill_at is None:
            self.kill_at = now + self.stall + 15.0
        if fatal:
            self.kill_at = min(self.kill_at, now + 20.0)
            try:
                self.store.set(ABORT_ALL, fatal[:500])
            except Exception:  # noqa: BLE001
                pass

    def watch(self) -> None:
        while True:
            now = time.monotonic()
            try:
                msg = self.q.get(timeout=0.5)
            except _queue.Empty:
                msg = None
            if msg is not None:
                self.handle(msg, now)
                continue  # drain the queue before looking at the processes
            self.check_deaths(now)
            if all(not p.is_alive() for p in self.procs) and len(self.exited) == len(self.procs):
                return
            why = self.past_limit(now)
            if why:
                alive = [r for r, p in enumerate(self.procs) if p.is_alive()]
                where = ", ".join(f"rank {r} in {self.current.get(r, '<init>')!r}" for r in alive)
                self.fail(f"killed ranks {alive}: {why} ({where})")
                self.kill_alive()
                for p in self.procs:
                    p.join(10)
                return

    def handle(self, msg: tuple, now: float) -> None:
        kind, rank = msg[0], msg[1]
        if kind == "meta":
            self.meta = msg[2]
        elif kind == "part_start":
            self.current[rank] = msg[2]
            if self.outcomes[msg[2]].status == "not run":
                self.outcomes[msg[2]].status = "running"
        elif kind == "part_error":
            self.outcomes[msg[2]].errors[rank] = msg[3]
            self.log(f"!! part {msg[2]!r} raised on rank {rank}:\n{_indent(msg[3])}")
            self.trouble(now)
        elif kind == "part_done":
            self.part_done(msg, now)
        elif kind in ("init_error", "fatal"):
            self.failures.append(f"rank {rank}: {kind}\n{msg[2]}")
            self.log(f"!! rank {rank} {kind.replace('_', ' ')}:\n{_indent(msg[2])}")
            self.trouble(now, f"rank {rank}: {kind}")
        elif kind == "exit":
            self.exited[rank] = msg[2]

    def part_done(self, msg: tuple, now: float) -> None:
        _, _, name, status, reason, rows, secs = msg
        o = self.outcomes[name]
        o.status, o.reason, o.rows, o.seconds = status, reason, rows or [], secs
        if self.kill_at is not None and not self.death:
            self.kill_at = None  # every rank got through the status exchange: progress
        if name == self.parts[-1]:
            self.exit_by = now + EXIT_GRACE_S  # closing communicators must not hang the run
        if self.on_part_done:
            self.on_part_done(o)

    def check_deaths(self, now: float) -> None:
        for r, p in enumerate(self.procs):
            if not p.is_alive() and r not in self.exited and p.exitcode is not None:
                self.exited[r] = p.exitcode
                where = (
                    f"in part {self.current[r]!r}"
                    if r in self.current
                    else "before it reported starting a part"
                )
                self.fail(f"rank {r} died with {_exit_code(p.exitcode)} ({where})")
                self.trouble(now, self.failures[-1])
                # its peers cannot finish without it: end the run now (a short grace for
                # their last messages), not after the stall timeout
                self.kill_at = min(self.kill_at or now, now + DEATH_GRACE_S)
                self.death = self.failures[-1]

    def past_limit(self, now: float) -> str | None:
        if now > self.deadline:
            return f"--timeout {self.args.timeout:.0f} s reached"
        if self.exit_by is not None and now > self.exit_by:
            return f"still alive {EXIT_GRACE_S:.0f} s after the last part (closing communicators hung?)"
        if self.kill_at is not None and now > self.kill_at:
            if self.death:
                return f"a peer is gone ({self.death})"
            return f"no progress for {self.stall:.0f} s (--stall-timeout) after an error"
        return None

    def kill_alive(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        for p in self.procs:
            p.join(5)
        self.q.close()

    def result(self) -> ChildRun:
        failures = self.failures
        for r, c in sorted(self.exited.items()):
            # exit code 1 only says "a part failed", which that part's outcome already reports
            if c not in (0, 1, None) and not any(f.startswith(f"rank {r}") for f in failures):
                failures.append(f"rank {r} exited with code {c}")
        for o in self.outcomes.values():
            if o.status == "running":
                o.status = "error"
                o.reason = o.reason or "did not finish (a rank died or was killed)"
            elif o.status == "not run" and failures:
                o.reason = "not reached (run aborted)"
        interrupted = any(f.startswith("interrupted") for f in failures)
        return ChildRun(self.outcomes, self.meta, failures, interrupted=interrupted)


def run_parent_part(spec: PartSpec, args: argparse.Namespace) -> PartOutcome:
    """Run a CPU part in this process."""
    o = PartOutcome(spec.name)
    t0 = time.perf_counter()
    try:
        rows = resolve_part(spec)(args)
        o.rows = normalize_rows(rows, spec.name)
        o.status = "ok"
    except (PartSkipped, PartUnavailable) as e:
        o.status, o.reason = "skipped", str(e)
    except Exception as e:  # noqa: BLE001
        o.status, o.reason = "error", f"{type(e).__name__}: {e}"
        o.errors[-1] = traceback.format_exc()
    o.seconds = time.perf_counter() - t0
    return o


def _indent(text: str, pad: str = "   | ") -> str:
    return "\n".join(pad + line for line in str(text).rstrip().splitlines())
