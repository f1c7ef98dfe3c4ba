"""IpcTransport without a GPU: argument checks, and its round protocol as a state machine.

The protocol (eplb_pynccl.ipc.RoundProtocol) runs here on a virtual node: ranks step in a
random order, events complete after random delays, and every step checks that a rank pulls
only rows its source has made stable and not yet overwritten, that it overwrites rows only
after every reader has finished copying them, and that every rank finishes every round.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_pynccl._nccl import cuda
from eplb_pynccl.ipc import IpcTransport, RoundProtocol
from eplb_pynccl.transport import Transport


class _Store:
    def set(self, k, v):
        pass

    def get(self, k):
        return b""


class _Setup(Transport):
    """A set-up transport of rank ``rank`` of ``world`` whose all_gather_bytes hands every
    rank the same data (the given ones for the others), recording the calls."""

    def __init__(self, rank=0, world=2, others=None):
        self.rank, self.world_size = rank, world
        self.others = others or {}
        self.calls = []

    device = None

    def check_tensor(self, t, name):
        pass

    def exchange(self, sends, recvs, stream=None, timeout=None):
        raise AssertionError("not used")

    def wait(self, stream=None, timeout=None):
        pass

    def all_gather_bytes(self, data):
        self.calls.append(data)
        k = len(self.calls) - 1
        out = []
        for r in range(self.world_size):
            if r == self.rank:
                out.append(data)
            else:
                other = self.others[r]
                sizes = len(other).to_bytes(8, "little")
                out.append(sizes if k % 2 == 0 else other.ljust(len(data), b"\0"))
        assert len({len(x) for x in out}) == 1, "all_gather_bytes wants equal lengths"
        return out


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (
            {"rank": 0, "world_size": 2},
            ValueError,
            "IpcTransport needs a store (set/get), a setup transport or group, or a "
            "communicator for its set-up",
        ),
        (
            {"setup": "gloo"},
            TypeError,
            "setup must be an eplb_pynccl Transport or a torch.distributed ProcessGroup, got str",
        ),
        (
            {"rank": 1, "setup": _Setup(0, 2)},
            ValueError,
            "rank 1 differs from the setup transport's rank 0",
        ),
        (
            {"world_size": 3, "setup": _Setup(0, 2)},
            ValueError,
            "world_size 3 differs from the setup transport's world_size 2",
        ),
        (
            {"rank": 0, "world_size": 2, "store": object()},
            TypeError,
            "store must have set() and get(), got object",
        ),
        (
            {"rank": "0", "world_size": 2, "store": _Store()},
            TypeError,
            "rank must be an int, got str",
        ),
        (
            {"rank": 0, "world_size": 0, "store": _Store()},
            ValueError,
            "world_size must be >= 1, got 0",
        ),
        (
            {"rank": 2, "world_size": 2, "store": _Store()},
            ValueError,
            "rank must be in [0, 2), got 2",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "ranks_per_node": 3},
            ValueError,
            "ranks_per_node (3) is more than world_size (2)",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "ranks_per_node": 0},
            ValueError,
            "ranks_per_node must be >= 1, got 0",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "ranks_per_node": True},
            TypeError,
            "ranks_per_node must be an int, got bool",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "timeout": float("nan")},
            ValueError,
            "timeout must be a finite number of seconds, got nan",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "timeout": True},
            ValueError,
            "timeout must be a positive number of seconds, got True",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "timeout": -1},
            ValueError,
            "timeout must be a positive number of seconds, got -1",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "communicator": "c"},
            TypeError,
            "communicator must be an eplb_pynccl.Communicator, got str",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "signals": "gpu"},
            ValueError,
            "signals must be one of ('auto', 'stream', 'host'), got 'gpu'",
        ),
        (
            {"rank": 0, "world_size": 2, "store": _Store(), "pull_graphs": 1},
            TypeError,
            "pull_graphs must be True or False, got 1",
        ),
    ],
)
def test_bad_arguments_are_refused_before_any_cuda_call(kwargs, exc, msg):
    with pytest.raises(exc) as info:
        IpcTransport(**kwargs)
    assert str(info.value) == msg


def test_setup_exchange_over_a_transport_carries_data_of_any_length():
    """The set-up all-gather through a transport's all_gather_bytes (equal lengths): the
    lengths first, then the data padded to the longest; each rank gets back exactly its
    peers' bytes."""
    from types import SimpleNamespace

    setup = _Setup(1, 3, others={0: b"a", 2: b"\x00third\x00"})
    fake = SimpleNamespace(store=None, _setup=setup, _gen=0)
    got = IpcTransport._all_gather(fake, b"rank one")
    assert got == [b"a", b"rank one", b"\x00third\x00"]
    assert setup.calls == [(8).to_bytes(8, "little"), b"rank one"]


@pytest.mark.skipif(cuda.driver() is not None, reason="a CUDA driver is present")
def test_without_a_gpu_the_error_says_so():
    with pytest.raises(RuntimeError) as info:
        IpcTransport(0, 2, _Store())
    assert (
        str(info.value) == f"IpcTransport needs a GPU and its driver: {cuda.unavailable_reason()}"
    )


# ---- the protocol on a virtual node ----------------------------------------------------------


class _Event:
    """A recorded event that completes after ``delay`` scheduler ticks (stream order: a
    later record completes after an earlier one)."""

    def __init__(self):
        self.round, self.at = 0, 0

    def record(self, rnd, now, delay):
        self.round, self.at = rnd, max(self.at, now + delay)

    def complete(self, now):
        return now >= self.at


class _Rank:
    def __init__(self, r):
        self.r = r
        self.ready, self.done = _Event(), _Event()
        self.c_ready = self.c_done = 0  # the published counters
        self.round = 0  # rounds applied
        self.launched = 0
        self.proto = None
        self.pulls_landed = 0  # highest round whose pulls have landed (at the done event)


class _VirtualNode:
    """``n`` ranks running :class:`RoundProtocol` for ``rounds`` rounds, one random rank a
    scheduler tick; events complete a random number of ticks after they are recorded."""

    def __init__(self, seed: int, n: int, rounds: int, p_edge: float):
        self.rng = rng = np.random.default_rng(seed)
        self.n, self.rounds = n, rounds
        # per round: who pulls from whom (a directed graph over the node's ranks)
        self.graph = [
            [[p for p in range(n) if p != r and rng.random() < p_edge] for r in range(n)]
            for _ in range(rounds)
        ]
        self.ranks = [_Rank(r) for r in range(n)]
        self.now = 0
        self.log: list[tuple[int, int, int]] = []
        self.readers_of: dict[int, list[int]] = {}

    def _peer_ready(self, p, q):
        s = self.ranks[p]
        ok = s.c_ready >= q and s.ready.complete(self.now)
        if ok:  # the record we see is round q's: the source has not moved on (no ABA)
            assert s.ready.round == q, (p, q, s.ready.round)
        return ok

    def _peer_done(self, p, q):
        s = self.ranks[p]
        return s.c_done >= q and s.done.complete(self.now)

    def _protocol(self, rank: _Rank, q: int):
        """Round ``q``'s protocol for ``rank``, and the ranks that read its rows."""
        sources = self.graph[q - 1][rank.r]
        readers = [p for p in range(self.n) if rank.r in self.graph[q - 1][p]]

        def pull(p):
            s = self.ranks[p]
            # the source's rows of round q are stable (its phase A done) and not yet overwritten
            assert s.launched == q and s.round == q - 1, (rank.r, p, q, s.launched, s.round)
            self.log.append((q, rank.r, p))

        def finish():
            rank.done.record(q, self.now, int(self.rng.integers(0, 4)))
            rank.c_done = q

        def local_done():
            if rank.done.complete(self.now):
                rank.pulls_landed = max(rank.pulls_landed, rank.done.round)
                return True
            return False

        return RoundProtocol(
            sources, readers, self._peer_ready, self._peer_done, pull, finish, local_done
        ), readers

    def _tick(self):
        """One rank launches its next round, or polls it and applies it once it is done."""
        self.now += 1
        ranks = self.ranks
        rank = ranks[int(self.rng.integers(0, self.n))]
        if rank.round == self.rounds:
            return
        q = rank.round + 1
        if rank.launched < q:  # launch: ready after this rank's phase A
            rank.proto, self.readers_of[rank.r] = self._protocol(rank, q)
            rank.launched = q
            rank.ready.record(q, self.now, int(self.rng.integers(0, 4)))
            rank.c_ready = q
            rank.proto.start(q)
            rank.proto.poll()
        elif rank.proto.poll():  # done: apply (overwrite rows readers copied)
            for p in self.readers_of[rank.r]:
                assert ranks[p].pulls_landed >= q or (
                    ranks[p].done.round >= q and ranks[p].done.complete(self.now)
                ), (rank.r, p, q)
            rank.round = q

    def run(self):
        rounds, n, graph = self.rounds, self.n, self.graph
        for _ in range(200_000):
            if all(k.round == rounds for k in self.ranks):
                break
            self._tick()
        assert all(k.round == rounds for k in self.ranks), "the protocol deadlocked"
        expect = sorted((q + 1, r, p) for q in range(rounds) for r in range(n) for p in graph[q][r])
        assert sorted(self.log) == expect  # every pull exactly once


def _run(seed: int, n: int, rounds: int, p_edge: float):
    _VirtualNode(seed, n, rounds, p_edge).run()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from([0.0, 0.3, 1.0]),
)
def test_round_protocol_orders_pulls_and_overwrites(seed, n, rounds, p_edge):
    _run(seed, n, rounds, p_edge)


def test_round_protocol_waits_for_a_slow_reader():
    # rank 0's rows are read by rank 1; until rank 1's pulls have landed rank 0 must not apply
    state = {"ready1": False, "done1": False, "pulled": []}
    proto = RoundProtocol(
        [],
        [1],
        lambda p, q: True,
        lambda p, q: state["done1"],
        state["pulled"].append,
        lambda: None,
        lambda: True,
    )
    proto.start(1)
    assert proto.poll() is False
    state["done1"] = True
    assert proto.poll() is True
    # a puller waits for its source
    proto = RoundProtocol(
        [0],
        [],
        lambda p, q: state["ready1"],
        lambda p, q: True,
        state["pulled"].append,
        lambda: None,
        lambda: True,
    )
    proto.start(1)
    assert proto.poll() is False and state["pulled"] == []
    state["ready1"] = True
    assert proto.poll() is True and state["pulled"] == [0]
