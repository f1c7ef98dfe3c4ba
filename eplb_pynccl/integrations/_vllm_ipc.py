"""The CUDA IPC path of eplb_pynccl's vLLM communicator (backend ``"eplb_pynccl_ipc"``).

Every ``execute()`` is one :class:`~eplb_pynccl.IpcTransport` round on every EP rank, also
when a rank has nothing queued (rounds are numbered, so every rank must run the same ones).
A receive *pulls* the expert's row straight out of the sender's registered weight tensor,
``expert_weights[layer][i][row]``, where ``row`` is the expert's first slot on the sender in
the old map (the row vLLM hands to ``add_send``; both sides derive it from the same map).
The sender's ``add_send`` only tells it who reads its rows: it checks that the tensors are
exactly those rows, and waits at the end of the round until its readers are done.

Nothing here launches an SM kernel or uses NCCL: the pulls are copy-engine copies on the
transport's own stream and every wait is a host poll with the timeout, which is why this
path may run on vLLM's async EPLB thread beside the forward pass's NCCL kernels.

:class:`WeightRows` (where each row lies) and :func:`plan_pulls` (the copies of one
execute) are pure and run without a GPU; :class:`IpcPath` drives the transport.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .._deadline import Deadline, poll_until

__all__ = ["IpcPath", "WeightRows", "plan_pulls"]


class WeightRows:
    """One rank's expert weights as the transport registers them: tensor ``i`` of layer
    ``layer`` is buffer ``first[layer] + i`` (``layer * tensors_per_layer + i`` when every
    layer has as many tensors, as in vLLM); row ``r`` of buffer ``b`` starts ``r * stride[b]``
    bytes into it and is ``nbytes[b]`` contiguous bytes."""

    def __init__(self, expert_weights) -> None:
        layers = [list(ws) for ws in expert_weights]
        self.tensors = [t for ws in layers for t in ws]
        self.counts = [len(ws) for ws in layers]
        self.first = [int(x) for x in np.cumsum([0, *self.counts[:-1]])] if layers else []
        self.num_layers = len(layers)
        self.shape = [tuple(t.shape[1:]) for t in self.tensors]
        self.dtype = [t.dtype for t in self.tensors]
        self.stride = [t.stride(0) * t.element_size() if t.dim() else 0 for t in self.tensors]
        self.nbytes = [
            (t.numel() // t.shape[0]) * t.element_size() if t.dim() and t.shape[0] else 0
            for t in self.tensors
        ]
        self.ptr = [t.data_ptr() for t in self.tensors]

    def problems(self) -> list[str]:
        """What makes these weights unusable for row pulls (empty: nothing)."""
        out = []
        if not self.tensors:
            return ["there are no expert weights"]
        rows = self.tensors[0].shape[0] if self.tensors[0].dim() else 0
        for layer, n in enumerate(self.counts):
            for i in range(n):
                t = self.tensors[self.first[layer] + i]
                name = f"expert_weights[{layer}][{i}]"
                if t.dim() == 0 or t.shape[0] == 0:
                    out.append(f"{name} has no expert rows (shape {tuple(t.shape)})")
                elif t.shape[0] != rows:
                    out.append(
                        f"{name} has {t.shape[0]} expert rows, expert_weights[0][0] has {rows}"
                    )
                elif not t[0].is_contiguous():
                    out.append(
                        f"{name}'s rows are not contiguous (shape {tuple(t.shape)}, strides "
                        f"{tuple(t.stride())}): a row must be one block of memory to be copied"
                    )
        return out

    def describe(self) -> list:
        """What every rank must agree on: each tensor's shape, strides and dtype."""
        return [(tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in self.tensors]

    def buffer(self, layer: int, i: int) -> int:
        return self.first[layer] + i

    def row_ptr(self, b: int, row: int) -> int:
        return self.ptr[b] + row * self.stride[b]


def layout_disagreements(descriptions: list) -> list[str]:
    """Where ranks' :meth:`WeightRows.describe` differ from rank 0's (empty: they agree)."""
    ref = descriptions[0]
    out = []
    for r, d in enumerate(descriptions[1:], start=1):
        if len(d) != len(ref):
            out.append(f"rank {r} has {len(d)} expert weight tensors, rank 0 has {len(ref)}")
            continue
        for b, (mine, theirs) in enumerate(zip(d, ref)):
            if mine != theirs:
                out.append(
                    f"rank {r}'s weight tensor {b} has shape {mine[0]}, strides {mine[1]}, "
                    f"{mine[2]}; rank 0's has shape {theirs[0]}, strides {theirs[1]}, {theirs[2]}"
                )
                break
    return out


def plan_pulls(recvs, bufs, stride, nbytes) -> list[tuple[int, int, int, int, int]]:
    """The copies of one execute's receives: ``[(peer, rbuf, roff, dst, n)]``.

    ``recvs``: ``[(peer, sender_row, dsts)]`` in call order, ``dsts[i]`` = ``(storage, ptr)``
    of the destination of tensor ``i`` (its allocation's start and its own address);
    ``bufs[i]``, ``stride[i]``, ``nbytes[i]``: the registered buffer of the layer's tensor
    ``i``, its row stride and row length in bytes (the same on every rank). One copy per
    receive and tensor, except that consecutive receives from one peer merge into one copy
    of a tensor where both ends are adjacent: sender rows ``r, r+1, ...`` of a tensor whose
    rows are back to back, into destinations laid end to end in one allocation. Grouped by
    peer (in order of first appearance), then by tensor."""
    by_peer: dict[int, list] = {}
    for peer, row, dsts in recvs:
        by_peer.setdefault(peer, []).append((row, dsts))
    out = []
    for peer, ops in by_peer.items():
        for i, b in enumerate(bufs):
            step, n = stride[i], nbytes[i]
            dense = step == n
            run = None  # [first row, last row, storage, dst, bytes]
            for row, dsts in ops:
                storage, dst = dsts[i]
                if (
                    run is not None
                    and dense
                    and row == run[1] + 1
                    and storage == run[2]
                    and dst == run[3] + run[4]
                ):
                    run[1] = row
                    run[4] += n
                    continue
                if run is not None:
                    out.append((peer, b, run[0] * step, run[3], run[4]))
                run = [row, row, storage, dst, n]
            if run is not None:
                out.append((peer, b, run[0] * step, run[3], run[4]))
    return out


class _Remote:
    """The receive side of a one-sided round's messages, as IpcTransport reads them."""

    __slots__ = ("rbuf", "roff")

    def __init__(self, rbuf, roff) -> None:
        self.rbuf, self.roff = rbuf, roff


class IpcPath:
    """The IPC half of one communicator: its transport (buffers registered) and the rows.

    Driven by one thread at a time (any thread: it makes the transport's device current
    before each round)."""

    def __init__(self, transport, rows: WeightRows) -> None:
        self.t = transport
        self.rows = rows

    # checks of add_send/add_recv -------------------------------------------------------
    def fail(self, msg: str) -> ValueError:
        """A refused call: the round this rank was queueing will not run, so the transport
        is aborted (peers learn it at once instead of at their timeout)."""
        self.t.abort(msg)
        return ValueError(msg + "; the communicator was aborted")

    def check_layer(self, what: str, layer) -> int:
        if layer is None:
            raise self.fail(
                f"{what}: the IPC transport needs set_transfer_context(old_indices, layer_idx) "
                "before the layer's add_send/add_recv (it reads the sender's weight rows, found "
                "from the old map)"
            )
        if not 0 <= layer < self.rows.num_layers:
            raise self.fail(
                f"{what}: layer_idx {layer} of set_transfer_context is not a layer of the "
                f"communicator's expert_weights (0..{self.rows.num_layers - 1})"
            )
        return layer

    def check_send(self, layer: int, row, expert: int, tensors) -> None:
        rows = self.rows
        if row is None:
            raise self.fail(
                f"add_send: expert {expert} is in no slot of this rank (rank {self.t.rank}) in "
                f"the old map of layer {layer}"
            )
        self._check_count("add_send", layer, tensors)
        for i, t in enumerate(tensors):
            b = rows.buffer(layer, i)
            if (
                t.data_ptr() != rows.row_ptr(b, row)
                or tuple(t.shape) != rows.shape[b]
                or t.dtype != rows.dtype[b]
            ):
                raise self.fail(
                    f"add_send: tensors[{i}] of expert {expert} is not row {row} of "
                    f"expert_weights[{layer}][{i}] (the expert's first slot on this rank in the "
                    "old map), the registered row its peers read over CUDA IPC"
                )

    def check_recv(self, layer: int, row, src: int, expert: int, tensors) -> None:
        rows = self.rows
        if row is None:
            raise self.fail(
                f"add_recv: expert {expert} is in no slot of rank {src} in the old map of "
                f"layer {layer}"
            )
        self._check_count("add_recv", layer, tensors)
        for i, t in enumerate(tensors):
            b = rows.buffer(layer, i)
            if tuple(t.shape) != rows.shape[b] or t.dtype != rows.dtype[b]:
                raise self.fail(
                    f"add_recv: tensors[{i}] is {tuple(t.shape)} {t.dtype}, but a row of "
                    f"expert_weights[{layer}][{i}] is {rows.shape[b]} {rows.dtype[b]}"
                )
            if not t.is_contiguous():
                raise self.fail(f"add_recv: tensors[{i}] is not contiguous")

    def _check_count(self, what: str, layer: int, tensors) -> None:
        n = self.rows.counts[layer]
        if len(tensors) != n:
            raise self.fail(
                f"{what}: {len(tensors)} tensors, but layer {layer} of expert_weights has {n}"
            )

    # one round ---------------------------------------------------------------------------
    def execute(self, torch, sends, recvs, layer, stream) -> None:
        """One round of the queued ops (``_Op``s with the sender's row), then wait on the host
        until this rank's receives landed and its readers are done, or the timeout."""
        t, rows, me = self.t, self.rows, self.t.rank
        t.make_current()
        out = []
        for op in sends:
            if op.peer != me:
                b = rows.buffer(layer, 0)
                out.append((op.peer, (rows.row_ptr(b, op.row), rows.nbytes[b])))
        # (peer, sender row, destinations) per receive; then plan_pulls' copies
        asked: list[tuple[int, int, list[tuple[int, int]]]] = []
        pulls: list[tuple[int, int, int, int, int]] = []
        local = []
        if recvs:
            bufs = [rows.buffer(layer, i) for i in range(rows.counts[layer])]
            for op in recvs:
                if op.peer == me:
                    local.append(op)
                else:
                    dsts = [(x.untyped_storage().data_ptr(), x.data_ptr()) for x in op.tensors]
                    asked.append((op.peer, op.row, dsts))
            pulls = plan_pulls(
                asked, bufs, [rows.stride[b] for b in bufs], [rows.nbytes[b] for b in bufs]
            )
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for op in local:  # this rank's own rows: a copy on the stream, before the round
                for i, x in enumerate(op.tensors):
                    x.copy_(rows.tensors[rows.buffer(layer, i)][op.row], non_blocking=True)
        remote = _Remote(
            np.asarray([p[1] for p in pulls], dtype=np.int64),
            np.asarray([p[2] for p in pulls], dtype=np.int64),
        )
        rnd = t.prepare_round(out, [(p[0], (p[3], p[4])) for p in pulls], remote=(None, remote))
        timeout = t.timeout
        deadline = Deadline(timeout)
        rnd.launch(stream, deadline.at)

        def timed_out():
            unready, undone = rnd.waiting_on()
            why = []
            if unready:
                why.append(f"ranks {unready} never made their rows ready")
            if undone:
                why.append(f"ranks {undone} never finished reading this rank's rows")
            msg = (
                f"rank {me}: the IPC round of layer {layer} did not complete within "
                f"{timeout:.3g} s ({'; '.join(why) or 'its own copies did not finish'})"
            )
            t.abort(msg)
            raise TimeoutError(msg + "; the communicator was aborted")

        try:
            poll_until(rnd.done, deadline, timed_out)
        finally:  # the round's graphs and end event (a launch in flight completes first)
            rnd.release()
