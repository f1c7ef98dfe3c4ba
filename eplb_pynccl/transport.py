"""Layer 3: one small interface for a grouped point-to-point round, and two implementations.

A *round* is a list of sends and a list of receives, each ``(peer, tensor)``, posted together.
Between any two ranks, the i-th send of one matches the i-th receive of the other: callers
list them in the same order on both sides (the planner guarantees this).

* :class:`NcclTransport` drives this package's :class:`~eplb_pynccl.Communicator` (CUDA tensors).
* :class:`TorchTransport` drives ``torch.distributed`` point-to-point on a process group:
  a gloo group moves CPU tensors, and CUDA tensors staged through host memory; an nccl group
  moves CUDA tensors.

A third transport implements the same members (``device``, ``check_tensor``, ``exchange``,
``wait``, ``all_gather_bytes``; optionally ``poll_error``/``abort`` and ``accepts_raw``).
"""

from __future__ import annotations

import abc
from typing import Any

from .communicator import Communicator

__all__ = ["Transport", "NcclTransport", "TorchTransport"]


def _torch():
    import torch

    return torch


class Transport(abc.ABC):
    """What the shuffler needs from a transport."""

    rank: int
    world_size: int

    @property
    @abc.abstractmethod
    def device(self):
        """The torch.device whose tensors this transport moves without staging."""

    @abc.abstractmethod
    def check_tensor(self, t, name: str) -> None:
        """Raise ValueError (naming ``name``) if this transport cannot move tensor ``t``."""

    @abc.abstractmethod
    def exchange(self, sends: list[tuple[int, Any]], recvs: list[tuple[int, Any]], stream=None) -> None:
        """Post one grouped round. For CUDA transports the work is enqueued on ``stream`` (a
        torch.cuda.Stream; None = current) and this returns once enqueued; host transports
        return when the round is complete."""

    @abc.abstractmethod
    def wait(self, stream=None, timeout: float | None = None) -> None:
        """Block until the work enqueued on ``stream`` is done; raise on failure or timeout
        (after making further use of the transport fail fast)."""

    @abc.abstractmethod
    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (equal lengths), in rank order. Collective."""


class NcclTransport(Transport):
    """Rounds through an eplb_pynccl :class:`Communicator` (one NCCL group per round).

    Buffers may be tensors or raw ``(pointer, nbytes)`` device buffers (``accepts_raw``).
    """

    accepts_raw = True

    def __init__(self, communicator: Communicator) -> None:
        if not isinstance(communicator, Communicator):
            raise TypeError(f"communicator must be an eplb_pynccl.Communicator, got {type(communicator).__name__}")
        self.comm = communicator
        self.rank = communicator.rank
        self.world_size = communicator.world_size

    @property
    def device(self):
        return _torch().device("cuda", self.comm.device)

    def check_tensor(self, t, name: str) -> None:
        if t.device.type != "cuda" or t.device.index != self.comm.device:
            raise ValueError(
                f"{name} is on {t.device}, but the NCCL transport's communicator is on cuda:{self.comm.device}"
            )

    def exchange(self, sends, recvs, stream=None) -> None:
        s = _torch().cuda.current_stream(self.comm.device) if stream is None else stream
        self.comm.p2p([(t, p) for p, t in sends], [(t, p) for p, t in recvs], s.cuda_stream)

    def wait(self, stream=None, timeout: float | None = None) -> None:
        h = None if stream is None else stream.cuda_stream
        self.comm.wait(h, timeout)

    def poll_error(self) -> None:
        """Raise (after aborting the communicator) if NCCL reported an asynchronous error."""
        err = self.comm.async_error()
        if err is not None:
            self.comm.abort()
            raise err

    def abort(self) -> None:
        self.comm.abort()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        torch = _torch()
        n = len(data)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        out = torch.empty(n * self.world_size, dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.comm.device)
        self.comm.all_gather(buf, out, stream=stream.cuda_stream)
        self.comm.wait(stream.cuda_stream)
        host = out.cpu().numpy().tobytes()
        return [host[i * n : (i + 1) * n] for i in range(self.world_size)]


class TorchTransport(Transport):
    """Rounds through ``torch.distributed`` point-to-point on ``group`` (default: the world).

    gloo: CPU tensors move directly; CUDA tensors are staged through host memory (the engines'
    "gloo" option). nccl: CUDA tensors on the current device.
    """

    def __init__(self, group=None) -> None:
        torch = _torch()
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchTransport needs torch.distributed initialised (init_process_group)")
        self.group = group
        self.backend = str(dist.get_backend(group)).lower()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r for r in range(self.world_size)
        ]
        self._cuda_capable = "nccl" in self.backend

    @property
    def device(self):
        torch = _torch()
        if self._cuda_capable:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check_tensor(self, t, name: str) -> None:
        if self._cuda_capable:
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, but the {self.backend} group moves tensors on {self.device}")
        elif t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}; a {self.backend} group moves CPU or CUDA (staged) tensors")

    def exchange(self, sends, recvs, stream=None) -> None:
        torch = _torch()
        dist = torch.distributed
        g = self._global
        staged_back = []
        if not self._cuda_capable:
            # gloo: stage CUDA tensors through host memory.
            hs = []
            for peer, t in sends:
                hs.append((peer, t.cpu() if t.is_cuda else t))
            hr = []
            for peer, t in recvs:
                if t.is_cuda:
                    h = torch.empty(t.shape, dtype=t.dtype)
                    staged_back.append((h, t))
                    hr.append((peer, h))
                else:
                    hr.append((peer, t))
            sends, recvs = hs, hr
        # Tags keep the per-pair order explicit for backends that match by tag.
        ops = []
        count: dict[tuple[int, int], int] = {}
        for peer, t in sends:
            k = count[(0, peer)] = count.get((0, peer), -1) + 1
            ops.append(dist.P2POp(dist.isend, t, g[peer], self.group, tag=k))
        for peer, t in recvs:
            k = count[(1, peer)] = count.get((1, peer), -1) + 1
            ops.append(dist.P2POp(dist.irecv, t, g[peer], self.group, tag=k))
        if not ops:
            return
        if self._cuda_capable and stream is not None:
            with torch.cuda.stream(stream):
                reqs = dist.batch_isend_irecv(ops)
                for r in reqs:
                    r.wait()
        else:
            reqs = dist.batch_isend_irecv(ops)
            for r in reqs:
                r.wait()
        for h, t in staged_back:
            t.copy_(h)

    def wait(self, stream=None, timeout: float | None = None) -> None:
        torch = _torch()
        if self._cuda_capable or (stream is not None):
            (stream or torch.cuda.current_stream()).synchronize()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        torch = _torch()
        dist = torch.distributed
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self._cuda_capable:
            t = t.to(self.device)
        # the group's real size, not self.world_size: a transport misreporting its size must
        # still meet its peers here, so that verify=True can tell them all
        outs = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(outs, t, group=self.group)
        return [o.cpu().numpy().tobytes() for o in outs]

