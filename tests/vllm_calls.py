"""vLLM's EPLB call sequence on a communicator (move_to_buffer, move_from_buffer), for rank
processes without vLLM (the GPU machine has none): the same roles and calls, decided the same
way on every rank, not vLLM's code. ``old``/``new``: one layer's maps, slot ``s`` on rank
``s // P``, -1 empty."""

from __future__ import annotations

import contextlib

import numpy as np


def first_row(local, e) -> int:
    return int(np.flatnonzero(local == e)[0])


def remote_moves(old, new, n, P):
    """vLLM's roles for one layer, made up the same way on every rank: ``[(receiver,
    primary dst row, sender, sender's first row, expert)]``, one per expert a rank needs and
    does not hold; the sender is one of the expert's holders, spread over receivers."""
    out = []
    for r in range(n):
        ol, nl = old[r * P : (r + 1) * P], new[r * P : (r + 1) * P]
        seen = set()
        for d, e in enumerate(nl.tolist()):
            if e < 0 or e in ol or e in seen:
                continue
            seen.add(e)
            senders = [s for s in range(n) if e in old[s * P : (s + 1) * P]]
            s = senders[(r + e) % len(senders)]
            out.append((r, d, s, first_row(old[s * P : (s + 1) * P], e), e))
    return sorted(out, key=lambda m: (m[4], m[0]))


class VllmCalls:
    """vLLM's move_to_buffer / move_from_buffer call sequence, for a process without vLLM."""

    def __init__(self, torch, V, comm, rank, n, P):
        self.torch, self.V, self.comm, self.rank, self.n, self.P = torch, V, comm, rank, n, P

    def transfer(self, old, new, ws, buf, stream, layer):
        torch, me, P = self.torch, self.rank, self.P
        ol, nl = old[me * P : (me + 1) * P], new[me * P : (me + 1) * P]
        ctx = contextlib.nullcontext()
        if stream is not None:
            ctx = torch.cuda.stream(self.V._as_cuda_stream(torch, stream))
        with ctx:
            for d, e in enumerate(nl.tolist()):
                if e >= 0 and e != ol[d] and e in ol:
                    for w, b in zip(ws, buf):
                        b[d].copy_(w[first_row(ol, e)], non_blocking=True)
        moves = remote_moves(old, new, self.n, self.P)
        self.comm.set_transfer_context(torch.from_numpy(old), layer)
        for r, _, s, srow, e in moves:
            if s == me:
                self.comm.add_send([w[srow] for w in ws], r, e)
        for r, d, s, _, e in moves:
            if r == me:
                self.comm.add_recv([b[d] for b in buf], s, e)
        self.comm.execute()
        return [d for r, d, *_ in moves if r == me]

    def move_from(self, ws, buf, primary, old, new):
        me, P = self.rank, self.P
        ol, nl = old[me * P : (me + 1) * P], new[me * P : (me + 1) * P]
        first = {}
        for d, e in enumerate(nl.tolist()):
            if e < 0 or e == ol[d]:
                continue
            if e in ol or d in primary:
                for w, b in zip(ws, buf):
                    w[d].copy_(b[d], non_blocking=True)
                first.setdefault(e, d)
        for d, e in enumerate(nl.tolist()):
            if e >= 0 and e != ol[d] and e not in ol and d not in primary:
                for w in ws:
                    w[d].copy_(w[first[e]], non_blocking=True)
