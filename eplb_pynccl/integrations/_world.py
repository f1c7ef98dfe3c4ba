"""What the engine integrations (``vllm.py``, ``sglang.py``) share: a NCCL unique id made on
rank 0 of the engine's gloo group and shared over it, the communicator made from it, and the
check that the engine's
functions take the parameters this package was written against."""

from __future__ import annotations

import inspect

ORIGINAL = "_eplb_pynccl_original"  # attribute of our wrappers: the engine's function wrapped


def unwrapped(fn):
    """The engine's own function behind one of our wrappers (``fn`` itself otherwise)."""
    return getattr(fn, ORIGINAL, fn)


def signature_problems(prefix: str, modules: dict, expected: dict) -> list[str]:
    """What differs between the engine and ``expected`` (``{"module.attr.attr": [parameter
    names]}``, ``module`` a key of ``modules``): missing functions and other parameter lists,
    named ``prefix.module.attr``; empty when nothing differs."""
    problems = []
    for path, want in expected.items():
        mod, *names = path.split(".")
        obj = modules[mod]
        for n in names:
            obj = getattr(obj, n, None)
        if obj is None:
            problems.append(f"{prefix}.{path} is missing")
            continue
        got = list(inspect.signature(unwrapped(obj)).parameters)
        if got != want:
            problems.append(f"{prefix}.{path} takes ({', '.join(got)}), not ({', '.join(want)})")
    return problems


def share_unique_id(setup, who: str):
    """A NCCL :class:`~eplb_pynccl.UniqueId` made by rank 0 of ``setup`` (a
    :class:`~eplb_pynccl.TorchTransport` over the engine's gloo group) and gathered by every
    rank: collective. A failure to make it on rank 0 reaches every rank as an error instead
    of a wait (rank 0 raises its own; the others a RuntimeError naming ``who``, e.g. "EP
    rank 0")."""
    from .._nccl.table import UNIQUE_ID_BYTES
    from ..communicator import UniqueId

    raw = b"\0" * UNIQUE_ID_BYTES
    err = None
    if setup.rank == 0:
        try:
            raw = bytes(UniqueId.generate())
        except Exception as e:  # noqa: BLE001 - still shared, so that the others learn it failed
            err = e
    first = setup.all_gather_bytes((b"\1" if err is None else b"\0") + raw)[0]
    if err is not None:
        raise err
    if first[:1] != b"\1":
        raise RuntimeError(
            f"{who} could not make a NCCL unique id (its own error says why); no "
            "communicator was made"
        )
    return UniqueId.from_bytes(first[1:])


def nccl_communicator(setup, who: str, device, **options):
    """A :class:`~eplb_pynccl.Communicator` of ``setup``'s ranks (a
    :class:`~eplb_pynccl.TorchTransport` over the engine's gloo group) on ``device``, its
    unique id from :func:`share_unique_id` (``who`` as there); ``options``: the
    communicator's keyword arguments. Collective."""
    from ..communicator import Communicator

    uid = share_unique_id(setup, who)
    return Communicator(uid, setup.rank, setup.world_size, device, **options)
