"""A lost peer over gloo, with the shuffler's default settings (verify on): every failure of a
rearrangement is a RearrangeError naming the peers and the layers' state, within the
shuffler's timeout, and the shuffler refuses the next call (no retry can pair with a late
peer's first call)."""

from __future__ import annotations

import time

import pytest

from tests.shuffle_util import run_gloo
from tests.test_bad_input import _setup

torch = pytest.importorskip("torch")

TIMEOUT = 3.0
SLACK = 5.0  # process start-up noise on a busy 2-core machine; the bound is TIMEOUT + SLACK


def _result(sh, old, new):
    """What one rearrange call did: (kind, message, completed, pending, peers, seconds)."""
    from eplb_pynccl import RearrangeError

    t0 = time.monotonic()
    try:
        sh.rearrange(old, new)
        return ("ok", "", [], [], [], time.monotonic() - t0)
    except RearrangeError as e:
        return (
            "RearrangeError",
            str(e),
            e.completed_layers,
            e.pending_layers,
            e.peers,
            time.monotonic() - t0,
        )
    except BaseException as e:  # noqa: BLE001 - the test reports what came out instead
        return (type(e).__name__, str(e), None, None, None, time.monotonic() - t0)


def _absent_job(rank, world):
    old, new, weights, transport, Shuffler = _setup(rank, world)
    sh = Shuffler(transport, weights, timeout=TIMEOUT)
    if rank == 1:
        time.sleep(TIMEOUT + SLACK + 2)  # alive, never calls rearrange
        return None
    return _result(sh, old, new), _result(sh, old, new)


def test_a_peer_that_never_calls_rearrange_is_a_rearrange_error_within_the_timeout():
    first, again = run_gloo(_absent_job, 2, timeout=60)[0]
    kind, msg, done, pending, peers, seconds = first
    assert kind == "RearrangeError", (kind, msg)
    assert TIMEOUT <= seconds <= TIMEOUT + SLACK, seconds
    assert done == [] and pending == [0, 1]
    assert peers == [1]
    assert msg.startswith("rearrangement failed on rank 0 while verifying (before anything moved)")
    assert f"within {TIMEOUT:g} s" in msg
    assert msg.endswith("(layers complete: []; layers still old: [0, 1]; peers involved: [1])")
    # the next call is refused at once: it cannot pair with the late peer's first call
    kind, msg, done, pending, peers, seconds = again
    assert kind == "RearrangeError" and seconds < 1.0
    assert msg.startswith("this shuffler's transport failed earlier")
    assert pending == [0, 1] and peers == [1]


def _exit_job(rank, world):
    import os

    old, new, weights, transport, Shuffler = _setup(rank, world)
    sh = Shuffler(transport, weights, timeout=TIMEOUT)
    if rank == 1:
        os._exit(0)  # gone: its connections close
    return _result(sh, old, new)


def _run_with_exit(fn, world):
    # rank 1 exits without reporting: run rank 0 alone through run_gloo's queue
    import multiprocessing as mp
    import os
    import queue
    import tempfile

    from tests.shuffle_util import _child

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="eplb_gloo_"), "rendezvous")
    procs = [
        ctx.Process(target=_child, args=(r, world, rendezvous, fn, (), q)) for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        rank, status, val = q.get(timeout=60)
    except queue.Empty:
        raise AssertionError("rank 0 did not finish within 60 s") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert (rank, status) == (0, "ok"), val
    return val, procs[1].exitcode


def test_a_peer_that_exits_is_a_rearrange_error_naming_it():
    (kind, msg, done, pending, peers, seconds), code = _run_with_exit(_exit_job, 2)
    assert code == 0
    assert kind == "RearrangeError", (kind, msg)
    assert seconds <= TIMEOUT + SLACK
    assert done == [] and pending == [0, 1] and peers == [1]
    assert msg.startswith("rearrangement failed on rank 0 while verifying (before anything moved)")


def _late_job(rank, world):
    old, new, weights, transport, Shuffler = _setup(rank, world)
    sh = Shuffler(transport, weights, timeout=TIMEOUT)
    if rank == 1:
        time.sleep(TIMEOUT + 1)  # late: rank 0 has given up on its first call
        return [_result(sh, old, new)]
    return [_result(sh, old, new), _result(sh, old, new)]


def test_a_retry_after_a_timeout_cannot_pair_with_a_late_peer():
    (first, retry), (late,) = run_gloo(_late_job, 2, timeout=60)
    assert first[0] == "RearrangeError" and "while verifying" in first[1], first
    assert retry[0] == "RearrangeError", retry
    assert retry[1].startswith("this shuffler's transport failed earlier"), retry
    # the late peer does not meet a retry: it fails too, within its own timeout, and moves
    # nothing
    kind, msg, done, pending, peers, seconds = late
    assert kind == "RearrangeError", (kind, msg)
    assert seconds <= TIMEOUT + SLACK
    assert done == [] and pending == [0, 1] and peers == [0]
