"""One process per rank for the multi-GPU tests.

:func:`run_ranks` (one job) and :class:`RankPool` (several jobs on the same processes, so a
test module pays for process start-up, torch import and communicator init once per world
size) start ``world_size`` processes with the ``spawn`` method. Rank ``r`` uses device ``r``
(``CUDA_VISIBLE_DEVICES`` is left alone, so every rank sees every GPU). Each job calls
``fn(ctx, *args)`` in every rank, where ``ctx`` is a :class:`RankContext`; ``fn`` must be a
module-level function (it is sent by module and name).

Nothing here can hang a test run: a job that does not finish within ``timeout`` seconds, or
whose other ranks do not finish within ``grace`` seconds of one rank failing, kills every rank
process and raises :class:`RankTimeout` / :class:`RankFailure` (both ``AssertionError``), with
each failing rank's traceback.

The ranks' environment gets :data:`NCCL_ENV` (NVLink multicast off) before anything else runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait as _wait_ready

NCCL_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

__all__ = [
    "NCCL_ENV",
    "RankContext",
    "RankFailure",
    "RankPool",
    "RankTimeout",
    "free_port",
    "libcuda_loadable",
    "run_ranks",
]


class RankFailure(AssertionError):
    """At least one rank raised (or died); the message has every failing rank's traceback."""


class RankTimeout(AssertionError):
    """A job did not finish in time; every rank process was killed."""


def libcuda_loadable() -> bool:
    """Whether the CUDA driver library loads here (a GPU driver is installed)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RankContext:
    """What a job function gets in each rank process.

    Attributes:
        rank, world_size, device: this rank, the number of ranks, its CUDA device (= rank).
        host, port: the TCPStore address shared by all ranks (rank 0 hosts it).
        cache: a dict kept between jobs of one :class:`RankPool` (e.g. a communicator).
    """

    def __init__(
        self, rank: int, world_size: int, host: str, port: int, device: int | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = rank if device is None else device
        self.host = host
        self.port = port
        self.cache: dict = {}
        self._store = None
        self._keys = 0

    @property
    def store(self):
        """A torch.distributed.TCPStore for this job's ranks (made on first use; rank 0 hosts).

        Every rank that uses it must do so in the same job (rank 0 first creates the server;
        the others' clients retry until it is up)."""
        if self._store is None:
            from datetime import timedelta

            from torch.distributed import TCPStore

            self._store = TCPStore(
                self.host,
                self.port,
                self.world_size,
                self.rank == 0,
                timedelta(seconds=60),
                wait_for_workers=False,
            )
        return self._store

    def key(self, name: str) -> str:
        """A store key unique to this call: ranks that call key() in the same order agree."""
        self._keys += 1
        return f"eplb_pynccl_tests/{name}/{self._keys}"


def _resolve(module_name: str, module_file: str | None, qualname: str):
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        if not module_file:
            raise
        spec = importlib.util.spec_from_file_location(module_name, module_file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = mod
        spec.loader.exec_module(mod)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(conn, rank: int, world_size: int, host: str, port: int, env: dict, device=None) -> None:
    os.environ.update(env)
    ctx = RankContext(rank, world_size, host, port, device)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        module_name, module_file, qualname, args = task
        try:
            fn = _resolve(module_name, module_file, qualname)
            reply = ("ok", fn(ctx, *args))
        except BaseException as e:  # report everything, pytest's skip/fail outcomes included
            reply = ("err", type(e).__name__, str(e), traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send(
                ("err", type(e).__name__, f"cannot send the result: {e}", traceback.format_exc())
            )
    try:
        conn.close()
    finally:
        # No interpreter teardown: library destructors (NCCL, CUDA) must not hang an exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class RankPool:
    """``world_size`` rank processes that run jobs until :meth:`close` (or a failure)."""

    def __init__(
        self,
        world_size: int,
        env: dict | None = None,
        host: str = "127.0.0.1",
        devices: list | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.broken = False
        ctx = mp.get_context("spawn")
        full_env = dict(NCCL_ENV)
        full_env.update(env or {})
        port = free_port(host)
        self._procs = []
        self._conns = []
        try:
            for r in range(world_size):
                parent, child = ctx.Pipe(duplex=True)
                p = ctx.Process(
                    target=_worker,
                    args=(
                        child,
                        r,
                        world_size,
                        host,
                        port,
                        full_env,
                        None if devices is None else devices[r],
                    ),
                    name=f"eplb-test-rank{r}",
                    daemon=True,
                )
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
        except BaseException:
            self.kill()
            raise

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self._procs]

    def run(self, fn, *args, timeout: float = 120.0, grace: float = 15.0) -> list:
        """Run ``fn(ctx, *args)`` in every rank; return the per-rank results (rank order)."""
        if self.broken:
            raise RuntimeError("this RankPool was killed after an earlier failure")
        module = sys.modules.get(fn.__module__)
        task = (fn.__module__, getattr(module, "__file__", None), fn.__qualname__, args)
        for c in self._conns:
            c.send(task)
        start = time.monotonic()
        results, errors, pending = self._collect(start + timeout, grace)
        if not pending and not errors:
            return results
        # Something failed or hung: the processes may be stuck inside NCCL; kill them all.
        self.kill()
        elapsed = time.monotonic() - start
        if errors:
            self._raise_errors(fn.__qualname__, errors, pending, grace)
        raise RankTimeout(
            f"{fn.__qualname__}: ranks {sorted(pending)} of {self.world_size} did not finish "
            f"within {timeout:g} s (waited {elapsed:.1f} s); all rank processes were killed"
        )

    def _collect(self, deadline: float, grace: float):
        """``(results, errors, pending)``: each rank's result or error, waiting until
        ``deadline``, or ``grace`` seconds after the first error, for the ranks still running."""
        results: list = [None] * self.world_size
        errors: dict[int, str] = {}
        pending = set(range(self.world_size))
        first_error_at = None
        while pending:
            now = time.monotonic()
            limit = deadline if first_error_at is None else min(deadline, first_error_at + grace)
            if now >= limit:
                break
            waitables = []
            for r in pending:
                waitables += [self._conns[r], self._procs[r].sentinel]
            ready = set(_wait_ready(waitables, timeout=limit - now))
            for r in sorted(pending):
                conn, proc = self._conns[r], self._procs[r]
                if conn not in ready and proc.sentinel not in ready:
                    continue
                ok, value = self._outcome(r)
                if ok:
                    results[r] = value
                else:
                    errors[r] = value
                pending.discard(r)
                if r in errors and first_error_at is None:
                    first_error_at = time.monotonic()
        return results, errors, pending

    def _outcome(self, r: int):
        """``(True, result)`` or ``(False, error text)`` of rank ``r``, which is ready."""
        conn, proc = self._conns[r], self._procs[r]
        msg = None
        try:
            if conn.poll():
                msg = conn.recv()
        except (EOFError, OSError):
            msg = None
        if msg is None:
            proc.join(1.0)
            return False, f"rank {r} exited (exit code {proc.exitcode}) without reporting a result"
        if msg[0] == "ok":
            return True, msg[1]
        _, tname, text, tb = msg
        return False, f"rank {r} raised {tname}: {text}\n{tb}"

    def _raise_errors(self, name: str, errors: dict, pending: set, grace: float) -> None:
        """RankFailure naming every failed rank (pytest's skip where every failure is one)."""
        lines = [f"{len(errors)} of {self.world_size} ranks failed in {name}:"]
        lines += [errors[r] for r in sorted(errors)]
        if pending:
            lines.append(
                f"ranks {sorted(pending)} had not finished {grace:g} s after the first "
                "failure; all rank processes were killed"
            )
        skipped = [r for r in errors if "raised Skipped:" in errors[r]]
        if len(skipped) == len(errors) and not pending:
            import pytest

            pytest.skip(errors[skipped[0]].split("raised Skipped: ", 1)[1].split("\n", 1)[0])
        raise RankFailure("\n".join(lines))

    def kill(self) -> None:
        """Kill every rank process now (SIGKILL) and reap it."""
        self.broken = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(10)
        for c in self._conns:
            c.close()

    def close(self, timeout: float = 20.0) -> None:
        """Ask the ranks to exit; kill those that do not within ``timeout`` seconds."""
        if self.broken:
            return
        for c in self._conns:
            try:
                c.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()


def nccl_process_group(ctx: RankContext) -> None:
    """In a GPU job: this rank's device made current, and torch.distributed's NCCL process
    group over the job's store (once per process)."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(ctx.device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl",
            store=dist.PrefixStore("pg", ctx.store),
            rank=ctx.rank,
            world_size=ctx.world_size,
            device_id=torch.device("cuda", ctx.device),
        )


def run_ranks(
    fn, world_size: int, *args, timeout: float = 120.0, grace: float = 15.0, env=None, devices=None
) -> list:
    """Run ``fn(ctx, *args)`` once in each of ``world_size`` fresh rank processes (rank r on
    ``devices[r]``, default device r; several ranks may share a GPU: CUDA IPC works between
    processes on one device).

    Returns the per-rank results in rank order; raises RankFailure / RankTimeout (after
    killing every rank process) when a rank fails or the job exceeds ``timeout`` seconds.
    """
    pool = RankPool(world_size, env=env, devices=devices)
    try:
        return pool.run(fn, *args, timeout=timeout, grace=grace)
    finally:
        pool.close()


# ---- functions the harness's own tests run in rank processes ------------------------------


def selftest_job(ctx: RankContext, mode: str):
    if mode == "ok":
        return {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "device": ctx.device,
            "pid": os.getpid(),
            "env": {k: os.environ.get(k) for k in NCCL_ENV},
            "calls": ctx.cache.setdefault("calls", 0) + 1,
        }
    if mode == "count":
        ctx.cache["calls"] = ctx.cache.get("calls", 0) + 1
        return ctx.cache["calls"]
    if mode == "raise":
        if ctx.rank == ctx.world_size - 1:
            raise ValueError(f"boom from rank {ctx.rank}")
        return ctx.rank
    if mode == "raise_and_hang":
        if ctx.rank == 0:
            raise KeyError("rank 0 gave up")
        time.sleep(3600)
    if mode == "hang":
        if ctx.rank == 0:
            time.sleep(3600)
        return ctx.rank
    if mode == "die":
        if ctx.rank == 1:
            os._exit(3)
        return ctx.rank
    if mode == "store":
        key = ctx.key("selftest")
        if ctx.rank == 0:
            ctx.store.set(key, b"\x00\xffhello")
        return bytes(ctx.store.get(key))
    raise ValueError(f"unknown mode {mode!r}")
