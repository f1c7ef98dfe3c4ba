"""The bad-input catalogue: each case raises a clear exception and moves nothing.

CPU (gloo, 2 processes) unless the case needs a GPU; the communicator cases (closed or aborted
communicator, wrong device, bad peer) are in tests/test_gpu_comm.py and
tests/test_communicator_cpu.py. Counted in the README's reliability section.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.shuffle_util import random_maps, run_gloo

torch = pytest.importorskip("torch")

P = 4
SPEC = [[((8,), "float32"), ((2, 3), "bfloat16")], [((8,), "float32"), ((2, 3), "bfloat16")]]


def _setup(rank, world, seed=0):
    import torch as T

    from eplb_pynccl import ExpertShuffler, TorchTransport
    from tests.shuffle_util import make_weights

    rng = np.random.default_rng(seed)
    old, new = random_maps(rng, len(SPEC), world * P - 1, world, P)
    specs = [[(shape, getattr(T, dt)) for shape, dt in layer] for layer in SPEC]
    weights = make_weights(T, specs, old, rank, world, "cpu")
    return old, new, weights, TorchTransport(), ExpertShuffler


def _snapshot(weights):
    return [[t.view(torch.uint8).clone() for t in ws] for ws in weights]


def _same(weights, snap):
    return all(
        torch.equal(t.view(torch.uint8), s) for ws, ss in zip(weights, snap) for t, s in zip(ws, ss)
    )


def _map_cases(rank, world):
    old, new, weights, transport, Shuffler = _setup(rank, world)
    sh = Shuffler(transport, weights)
    snap = _snapshot(weights)
    bad_id = new.copy()
    bad_id[1, 2] = -5
    missing = new.copy()
    missing[0, 0] = 999
    cases = {
        "1-D map": (old[0], new[0]),
        "shape mismatch": (old, new[:, :-1]),
        "float map": (old.astype(np.float64), new),
        "id below -1": (old, bad_id),
        "expert held nowhere": (old, missing),
        "layers differ from weights": (old[:1], new[:1]),
        "slots differ from weight rows": (
            np.concatenate([old, old], axis=1),
            np.concatenate([new, new], axis=1),
        ),
    }
    out = {}
    for name, (o, n) in cases.items():
        try:
            sh.rearrange(o, n)
            out[name] = None
        except (ValueError, TypeError) as e:
            out[name] = (type(e).__name__, str(e))
    # num_physical not divisible by ep_size: a map of 2 * world * P - 1 slots
    odd = np.zeros((2, 2 * P - 1), dtype=np.int64)
    try:
        sh.rearrange(odd, odd)
        out["not divisible"] = None
    except ValueError as e:
        out["not divisible"] = ("ValueError", str(e))
    return out, _same(weights, snap)


def test_bad_maps_are_refused_before_anything_moves():
    for out, unchanged in run_gloo(_map_cases, 2):
        assert unchanged
        assert all(v is not None for v in out.values()), out
        assert out["1-D map"] == ("ValueError", out["1-D map"][1]) and "2-D" in out["1-D map"][1]
        assert "shape" in out["shape mismatch"][1]
        assert out["float map"] == ("TypeError", "old_map must be an integer array, got float64")
        assert "-5" in out["id below -1"][1] and "layer 1" in out["id below -1"][1]
        assert (
            out["expert held nowhere"][1]
            == "layer 0: new_map needs expert 999, which old_map holds nowhere"
        )
        assert (
            out["layers differ from weights"][1]
            == "old_map/new_map have 1 layers but expert_weights has 2"
        )
        assert out["slots differ from weight rows"][1] == (
            "maps give 8 slots per rank (num_physical 16 / ep_size 2) but the weight tensors have 4 expert rows"
        )
        assert out["not divisible"][1] == "num_physical (7) is not divisible by ep_size (2)"


class Local:  # not an eplb_pynccl Transport: the constructor refuses it by name
    pass


def _one_rank_transport():
    """A Transport of one process: the constructor's checks run, nothing may be exchanged."""
    import eplb_pynccl.transport as tr

    class OneRank(tr.Transport):
        rank, world_size = 0, 1
        device = torch.device("cpu")

        def check_tensor(self, t, name):
            if t.device.type != "cpu":
                raise ValueError(f"{name} is on {t.device}; this transport moves CPU tensors")

        def exchange(self, sends, recvs, stream=None, timeout=None):
            raise AssertionError("nothing may be exchanged")

        def wait(self, stream=None, timeout=None):
            pass

        def all_gather_bytes(self, data):
            return [data]

    return OneRank()


_GOOD = torch.zeros(4, 8)


def _bad(weights, exc, msg, id, transport=None, **options):
    """A case of the constructor's refusals: ``ExpertShuffler(transport, weights, **options)``
    (``transport`` None: a one-rank transport) raises ``exc`` matching ``msg``."""
    return pytest.param(transport, weights, options, exc, msg, id=id)


# (transport, expert_weights, options, exception, message)
_BAD_WEIGHTS = [
    _bad(
        [[_GOOD]],
        TypeError,
        "transport must be an eplb_pynccl Transport, got Local",
        "not-a-transport",
        transport=Local(),
    ),
    _bad([], ValueError, "expert_weights is empty: give at least one layer", "no-layers"),
    _bad(
        [_GOOD],
        TypeError,
        r"expert_weights\[0\] must be a non-empty list of tensors",
        "layer-not-a-list",
    ),
    _bad(
        [[_GOOD, "x"]],
        TypeError,
        r"expert_weights\[0\]\[1\] must be a torch.Tensor, got str",
        "weight-not-a-tensor",
    ),
    _bad([[torch.tensor(1.0)]], ValueError, "must have a leading expert dimension", "0-D-weight"),
    _bad(
        [[torch.zeros(8, 4).t()]],
        ValueError,
        r"expert_weights\[0\]\[0\] is not contiguous",
        "not-contiguous",
    ),
    _bad(
        [[_GOOD], [torch.zeros(5, 8)]],
        ValueError,
        "has 5 expert rows but expert_weights",
        "rows-differ-between-layers",
    ),
    _bad([[torch.zeros(4, 8, device="meta")]], ValueError, "is on meta", "meta-device"),
    _bad(
        [[_GOOD]],
        ValueError,
        "staging_bytes must be >= 0, got -1",
        "negative-staging_bytes",
        staging_bytes=-1,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        "max_messages_per_round must be >= 1, got 0",
        "zero-max_messages_per_round",
        max_messages_per_round=0,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"timeout must be a positive number of seconds, got -1$",
        "negative-timeout",
        timeout=-1,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"timeout must be a positive number of seconds, got 0$",
        "zero-timeout",
        timeout=0,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"timeout must be a finite number of seconds, got nan$",
        "nan-timeout",
        timeout=float("nan"),
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"timeout must be a positive number of seconds, got True$",
        "bool-timeout",
        timeout=True,
    ),
    _bad(
        [[_GOOD]],
        TypeError,
        r"pack_threshold must be an int, got bool$",
        "bool-pack_threshold",
        pack_threshold=True,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"timeout must be a positive number of seconds, got '5'$",
        "str-timeout",
        timeout="5",
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"ranks_per_node counts EP ranks per node, at most ep_size \(1\); got 3$",
        "ranks_per_node-above-ep_size",
        ranks_per_node=3,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        r"ranks_per_node must be >= 1, got 0$",
        "zero-ranks_per_node",
        ranks_per_node=0,
    ),
    _bad(
        [[_GOOD]],
        ValueError,
        "pack_threshold must be >= 0, got -1",
        "negative-pack_threshold",
        pack_threshold=-1,
    ),
    _bad(
        [[torch.zeros(0, 8)]],
        ValueError,
        r"^expert_weights\[0\]\[0\] is empty \(shape \(0, 8\)\): every weight tensor holds "
        r"at least one expert row of at least one element$",
        "no-expert-rows",
    ),
    _bad(
        [[_GOOD, torch.zeros(4, 0)]],
        ValueError,
        r"^expert_weights\[0\]\[1\] is empty \(shape \(4, 0\)\)",
        "rows-of-no-elements",
    ),
    _bad(
        [[_GOOD]],
        TypeError,
        r"^transactional must be a bool, got str$",
        "str-transactional",
        transactional="no",
    ),
]


@pytest.mark.parametrize("transport, weights, options, exc, msg", _BAD_WEIGHTS)
def test_bad_weights_are_refused_by_the_constructor(transport, weights, options, exc, msg):
    from eplb_pynccl import ExpertShuffler

    t = _one_rank_transport() if transport is None else transport
    with pytest.raises(exc, match=msg):
        ExpertShuffler(t, weights, **options)


def _disagree_job(rank, world, what):
    import torch as T

    from eplb_pynccl import TorchTransport

    old, new, weights, transport, Shuffler = _setup(rank, world)
    if what == "shapes" and rank == 1:
        weights[1][1] = T.zeros((P, 3, 2), dtype=T.bfloat16)  # same bytes, other shape
    if what == "maps" and rank == 1:
        new = old.copy()
    if what == "world_size" and rank == 1:

        class Liar(TorchTransport):
            pass

        transport = Liar()
        transport.world_size = 4  # thinks there are 4 ranks: plans 2 slots per rank
    sh = Shuffler(transport, weights)
    snap = _snapshot(weights)
    try:
        sh.rearrange(old, new, verify=True)
        return None, _same(weights, snap)
    except ValueError as e:
        return str(e), _same(weights, snap)


@pytest.mark.parametrize("what", ["shapes", "maps", "world_size"])
def test_verify_catches_ranks_that_disagree(what):
    out = run_gloo(_disagree_job, 2, what, timeout=60)
    for rank, (msg, unchanged) in enumerate(out):
        assert unchanged, f"rank {rank} moved weights"
        assert msg is not None, f"rank {rank} did not refuse"
    if what == "shapes":
        assert out[0][0].startswith(
            "verify=True: ranks disagree or refused the input: expert weight shapes/dtypes"
        )
    if what == "maps":
        assert (
            "old_map/new_map, ep_size or local expert rows (ranks [1] differ from rank 0)"
            in out[0][0]
        )
    if what == "world_size":
        # the lying rank refuses its own plan; the honest rank is told, not left waiting
        assert "slots per rank" in out[1][0]
        assert out[0][0].startswith("verify=True: ranks disagree or refused the input")


def _failure_job(rank, world):
    import torch as T

    from eplb_pynccl import RearrangeError, TorchTransport

    class Flaky(TorchTransport):
        """Fails the second round on every rank, before posting anything."""

        calls = 0

        def exchange(self, sends, recvs, stream=None, timeout=None):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise RuntimeError("injected transport failure")
            return super().exchange(sends, recvs, stream, timeout)

    old, new, weights, _, Shuffler = _setup(rank, world, seed=3)
    sh = Shuffler(Flaky(), weights, max_messages_per_round=4)  # several rounds
    h = sh.rearrange_async(old, new)
    err = None
    try:
        h.wait()
    except RearrangeError as e:
        err = e
    again = None
    try:
        h.step()
    except RearrangeError as e2:
        again = e2 is err
    refused_next = None
    try:
        sh.rearrange(new, old)
    except RearrangeError as e3:
        refused_next = str(e3)
    done, pending = list(err.completed_layers), list(err.pending_layers)
    ok_new = all(_layer_is(T, weights, new, rank, world, l) for l in done)
    ok_old = all(_layer_is(T, weights, old, rank, world, l) for l in pending)
    return str(err), done, pending, ok_new, ok_old, again, refused_next


def _layer_is(T, weights, amap, rank, world, layer):
    from tests.shuffle_util import expert_bytes

    Pn = amap.shape[1] // world
    for i, t in enumerate(weights[layer]):
        host = t.view(T.uint8).view(Pn, -1).numpy()
        for r in range(Pn):
            e = int(amap[layer, rank * Pn + r])
            if e >= 0 and not np.array_equal(host[r], expert_bytes(layer, e, i, host.shape[1])):
                return False
    return True


def test_failure_mid_rearrangement_leaves_whole_layers_and_step_reraises():
    for msg, done, pending, ok_new, ok_old, again, refused_next in run_gloo(_failure_job, 2):
        assert "injected transport failure" in msg
        assert done and pending and not set(done) & set(pending)
        assert ok_new, "a layer reported complete is not entirely new"
        assert ok_old, "a layer reported pending is not entirely old"
        assert again is True  # step() after the error raises the same error
        assert refused_next.startswith("this shuffler's transport failed earlier")


def _busy_job(rank, world):
    old, new, weights, transport, Shuffler = _setup(rank, world)
    sh = Shuffler(transport, weights)
    h = sh.rearrange_async(old, new)
    try:
        sh.rearrange_async(new, old)
        msg = None
    except RuntimeError as e:
        msg = str(e)
    h.wait()
    return msg


def test_second_rearrangement_while_one_is_in_progress():
    for msg in run_gloo(_busy_job, 2):
        assert msg == "a rearrangement is already in progress on this shuffler; finish it first"


def _timeout_job(rank, world, timeout):
    import time

    from eplb_pynccl import RearrangeError

    old, new, weights, transport, Shuffler = _setup(rank, world)
    sh = Shuffler(transport, weights, timeout=timeout)
    if rank == 1:
        new = old  # this rank has nothing to do: its peer waits for a message that never comes
    t0 = time.monotonic()
    try:
        sh.rearrange(old, new, verify=False)
        if rank == 1:
            time.sleep(timeout + 2)  # alive (a process that exits closes its connections at once)
        return None, time.monotonic() - t0, None
    except RearrangeError as e:
        return str(e), time.monotonic() - t0, e.peers


def test_a_peer_that_never_posts_times_out_within_the_shufflers_timeout():
    (msg, elapsed, peers), (msg1, _, _) = run_gloo(_timeout_job, 2, 3.0, timeout=60)
    assert msg1 is None  # rank 1 had nothing to move
    assert msg is not None and 3.0 <= elapsed <= 3.0 + 5, (msg, elapsed)
    assert (
        "the exchange with peers [1] did not complete within 3 s; the process group was aborted"
        in msg
    )
    assert peers == [1]


def _dtype_job(rank, world, verify):
    import torch as T

    old, new, weights, transport, Shuffler = _setup(rank, world)
    if rank == 1:  # same bytes per row, another dtype: the messages' sizes differ
        weights[0][0] = T.zeros((P, 4), dtype=T.float64)
    sh = Shuffler(transport, weights)
    snap = _snapshot(weights)
    try:
        sh.rearrange(old, new, **({} if verify is None else {"verify": verify}))
        return None, _same(weights, snap)
    except ValueError as e:
        return str(e), _same(weights, snap)


def test_ranks_with_other_dtypes_are_refused_by_default_over_gloo():
    # without the check gloo aborts both processes (sizes that do not match); by default a
    # host transport verifies every rearrangement
    for rank, (msg, unchanged) in enumerate(run_gloo(_dtype_job, 2, None, timeout=60)):
        assert unchanged, f"rank {rank} moved weights"
        assert msg is not None and msg.startswith(
            "verify=True: ranks disagree or refused the input: expert weight shapes/dtypes"
        ), msg


def _torch_transport_timeouts_job(rank, world):
    import os

    from eplb_pynccl import TorchTransport

    out = {}
    for value in (0, -1, float("nan"), float("inf"), True, "5"):
        try:
            TorchTransport(timeout=value)
        except ValueError as e:
            out[repr(value)] = str(e)
    os.environ["EPLB_PYNCCL_TIMEOUT"] = "nan"
    try:
        TorchTransport()
    except ValueError as e:
        out["env nan"] = str(e)
    return out


def test_torch_transport_refuses_timeouts_like_every_other_entry_point():
    (out,) = run_gloo(_torch_transport_timeouts_job, 1, timeout=60)
    positive, finite = "must be a positive number of seconds", "must be a finite number of seconds"
    assert out == {
        "0": f"timeout {positive}, got 0",
        "-1": f"timeout {positive}, got -1",
        "nan": f"timeout {finite}, got nan",
        "inf": f"timeout {finite}, got inf",
        "True": f"timeout {positive}, got True",
        "'5'": f"timeout {positive}, got '5'",
        "env nan": f"EPLB_PYNCCL_TIMEOUT {finite}, got nan",
    }


# ---- simulate_rearrangement's arguments (issue 22 item 9) ------------------------------

_OLD = np.array([[0, 1, 2, 3]])
_NEW = np.array([[3, 2, 1, 0]])


@pytest.mark.parametrize(
    "row_bytes, opts, exc, message",
    [
        ([[1.5]], {}, TypeError, "row_bytes[0][0] must be an int, got float"),
        (
            1.5,
            {},
            TypeError,
            "row_bytes must list, per layer, the bytes of one row of each tensor (a list of "
            "lists of ints), got float",
        ),
        ([[0]], {}, ValueError, "row_bytes[0][0] must be >= 1, got 0"),
        ([], {}, ValueError, "row_bytes is empty: give at least one layer"),
        ([[]], {}, ValueError, "row_bytes[0] is empty: every layer has at least one tensor"),
        ([[8], [8]], {}, ValueError, "row_bytes has 2 layers but old_map/new_map have 1"),
        ([[8]], {"cell": 0}, ValueError, "cell must be >= 1, got 0"),
        (
            [[8]],
            {"max_messages_per_round": 0},
            ValueError,
            "max_messages_per_round must be >= 1, got 0",
        ),
        ([[8]], {"pack_threshold": -1}, ValueError, "pack_threshold must be >= 0, got -1"),
        ([[8]], {"staging_bytes": -3}, ValueError, "staging_bytes must be >= 0, got -3"),
        ([[8]], {"transactional": "no"}, TypeError, "transactional must be a bool, got str"),
        ([[8]], {"one_sided": 1}, TypeError, "one_sided must be a bool, got int"),
    ],
)
def test_simulate_rearrangement_refuses_bad_arguments(row_bytes, opts, exc, message):
    import re

    from eplb_pynccl.simulate import simulate_rearrangement

    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        simulate_rearrangement(_OLD, _NEW, 2, row_bytes, **opts)


def test_simulate_rearrangement_takes_numpy_ints_and_bools():
    from eplb_pynccl.simulate import simulate_rearrangement

    out = simulate_rearrangement(
        _OLD, _NEW, 2, [[np.int64(8)]], transactional=np.bool_(False), staging_bytes=None
    )
    assert [r["experts_received"] for r in out] == [2, 2]
