"""Layer 4: the expert-weight shuffler (executor).

Given the plan (``planner.plan_rearrangement``), each rank moves its expert rows in *rounds*.
A round is a set of whole layers, the same on every rank (computed from the global plan, with
no communication), sized so that every rank's staging fits ``staging_bytes``. Per round:

A. on the exchange stream: save the rows that break cycles of local copies (the stash; one
   row per cycle, usually none); pack small tensors' rows (below ``pack_threshold`` bytes per
   row) into one block per tensor, peer by peer; in non-transactional mode also do local
   copies into rows nobody reads.
B. one grouped exchange through the transport: large rows are sent straight from the weight
   rows and received straight into destination rows where that is hazard-free (a row whose
   old content no send or copy reads, non-transactional mode only), else into staging. A run
   of consecutive source rows to one peer, all staged, travels as one message per tensor.
C. once the host has seen B complete (so a failed exchange never reaches live weights): the
   local copies of old content, ordered so that every row is read before it is overwritten;
   then staging into the live rows; then duplicates of rows received in this layer.

Transactional mode (the default) writes no live row before C, so after any failure each layer
is entirely old or entirely new, and :class:`~eplb_pynccl.RearrangeError` lists which.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from . import _buffers
from .errors import RearrangeError
from .planner import RearrangementPlan, plan_rearrangement
from .transport import Transport

__all__ = ["ExpertShuffler", "RearrangeStats", "RearrangeHandle"]

_ALIGN = 16  # staging parts start 16-byte aligned (any dtype view, vector copies)
DEFAULT_PACK_THRESHOLD = 1 << 20  # rows below 1 MiB are packed per peer
DEFAULT_MAX_MESSAGES = 1024


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class RearrangeStats:
    """What one rearrangement did on this rank."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0  # point-to-point messages posted by this rank (sends + receives)
    local_copies: int = 0  # expert rows copied on this rank (all tensors of a row count once)
    experts_sent: int = 0
    experts_received: int = 0
    rounds: int = 0
    seconds: float = 0.0
    planner_seconds: float = 0.0
    peak_extra_bytes: int = 0  # staging + row-index device memory held at the peak
    staging_bound: int = 0  # the bound in force (staging_bytes; see ExpertShuffler)
    # host time split (seconds): enqueueing rounds (copies, packing, NCCL calls), waiting for
    # exchanges to complete, enqueueing the copies that apply them
    launch_seconds: float = 0.0
    wait_seconds: float = 0.0
    apply_seconds: float = 0.0
    setup_seconds: float = 0.0  # host: building the rounds, staging and row indices
    layers_changed: list = field(default_factory=list)
    # ExpertShuffler(profile=True) only: GPU time per phase in ms, summed over rounds, from CUDA
    # events: "pack" (stash and pack copies), "exchange" (the NCCL group), "apply" (copies into
    # the live rows), "idle_after_exchange" (exchange done -> apply starts: the host seeing the
    # round complete), "idle_before_round" (previous apply done -> next round starts)
    gpu_ms: dict = field(default_factory=dict)


@dataclass
class _LayerWork:
    """One layer's ops on this rank, with its staging layout (offsets into the round's
    staging buffer) and index ranges (into the rearrangement's device index tensor)."""

    layer: int
    big: list  # tensors sent as their own messages
    small: list  # tensors packed per peer
    sends: list  # (peer, src_row), per peer by (src row, dst row) (see _layer_works)
    recvs: list  # (peer, dst_row, j) in the same order: j = row of the staged-receive blocks, -1 = in place
    recv_rows: list  # dst rows of the staged receives, by j
    copies_a: list  # (src, dst): phase A, into rows nobody reads (non-transactional)
    stash_src: list  # phase A: old rows saved into the stash blocks (one per copy cycle)
    copies_c: list  # (src, j, dst): phase C first, old content, ordered so that every row is
    # read before it is written; j >= 0: from stash block row j instead of row src
    copies_new: list  # (src, dst): phase C last, duplicates of rows new in this layer
    send_pack: dict  # peer -> src rows (small tensors)
    recv_pack: dict  # peer -> dst rows
    send_msgs: list  # (peer, first src row, rows): big tensors, one message per tensor
    recv_msgs: list  # (peer, first dst row, first j or -1 (in place), rows)
    recv_block: dict = field(default_factory=dict)  # tensor -> staging offset
    stash_block: dict = field(default_factory=dict)
    copy_block: dict = field(default_factory=dict)  # small tensor -> offset of its copies_c rows
    # packed small tensors: per direction ("s"/"r") and small tensor, one staging block with
    # every peer's rows (peers in send_pack/recv_pack order): one gather or scatter kernel per
    # tensor, one message per (peer, tensor)
    pack_block: dict = field(default_factory=dict)  # (dir, tensor) -> offset
    pack_spans: dict = field(default_factory=dict)  # dir -> [(peer, first row, rows)]
    idx: dict = field(default_factory=dict)  # name -> (start, length) in the index tensor


class _Round:
    __slots__ = ("index", "layers", "works", "event", "launched_at", "done", "marks")

    def __init__(self, index, layers):
        self.index = index
        self.layers = layers
        self.works = []
        self.event = None
        self.launched_at = 0.0
        self.done = False
        self.marks = {}  # profile=True: phase name -> CUDA event


class ExpertShuffler:
    """Rearranges expert weights in place across the ranks of a transport.

    Args:
        transport: :class:`NcclTransport` or :class:`TorchTransport` (or another Transport).
        expert_weights: ``expert_weights[layer] = [tensor, ...]``, each tensor shaped
            ``[num_local_experts, ...]`` and contiguous, on the transport's device (TorchTransport
            over gloo also takes CUDA tensors, staged through the host). Tensors keep their
            storage: rearrangement writes into them.
        staging_bytes: bound on extra device memory; default one layer of local experts
            (the largest layer). Larger exchanges are split into rounds of whole layers.
        pack_threshold: tensors whose row is smaller than this many bytes are packed (one
            gather per tensor, one message per peer and tensor); larger rows travel as their
            own messages without a copy.
        transactional: True (default): no live row is written before its layer's exchange has
            completed, so a failure leaves every layer entirely old or entirely new.
            False: rows nobody else reads are received into directly (less copying).
        max_messages_per_round: cap on p2p messages one rank posts in one NCCL group.
        ranks_per_node: prefer senders on the receiver's node (planner).
        timeout: seconds a round may take before the transport is aborted (default: the
            communicator's timeout for NcclTransport, else 600).
        profile: record CUDA events around each phase and report GPU time per phase in
            ``RearrangeStats.gpu_ms`` (filled by ``wait()``; costs a few events per round).

    On CUDA, construction also launches the copy kernels once on tiny tensors (~0.1 s), so
    that lazy module loading does not land in the first rearrangement.
    """

    def __init__(
        self,
        transport: Transport,
        expert_weights,
        *,
        staging_bytes: int | None = None,
        pack_threshold: int = DEFAULT_PACK_THRESHOLD,
        transactional: bool = True,
        max_messages_per_round: int = DEFAULT_MAX_MESSAGES,
        ranks_per_node: int | None = None,
        timeout: float | None = None,
        profile: bool = False,
    ) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(f"transport must be an eplb_pynccl Transport, got {type(transport).__name__}")
        import torch

        self._torch = torch
        self.transport = transport
        self.rank = transport.rank
        self.ep_size = transport.world_size
        if isinstance(expert_weights, (str, bytes)) or not hasattr(expert_weights, "__len__"):
            raise TypeError("expert_weights must be a list (per layer) of lists of tensors")
        if len(expert_weights) == 0:
            raise ValueError("expert_weights is empty: give at least one layer")
        layers = []
        rows = None
        for li, ws in enumerate(expert_weights):
            if isinstance(ws, torch.Tensor) or not hasattr(ws, "__len__") or len(ws) == 0:
                raise TypeError(f"expert_weights[{li}] must be a non-empty list of tensors")
            lw = []
            for ti, t in enumerate(ws):
                name = f"expert_weights[{li}][{ti}]"
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
                if t.dim() < 1:
                    raise ValueError(f"{name} must have a leading expert dimension, got a 0-d tensor")
                if not t.is_contiguous():
                    raise ValueError(f"{name} is not contiguous")
                transport.check_tensor(t, name)
                if rows is None:
                    rows = t.shape[0]
                if t.shape[0] != rows:
                    raise ValueError(
                        f"{name} has {t.shape[0]} expert rows but expert_weights[0][0] has {rows}: "
                        "every weight tensor holds the same local experts"
                    )
                lw.append(t)
            layers.append(lw)
        self.weights = layers
        self._bytes = [[t.view(torch.uint8).view(t.shape[0], -1) for t in lw] for lw in layers]
        # the same rows as the widest words that divide them: the gather/scatter kernels move
        # one element per thread, so 8-byte words run several times faster than bytes
        self._words = [[_word_rows(torch, b) for b in lb] for lb in self._bytes]
        # the NCCL transport takes (pointer, nbytes) rows: no tensor view per message
        self._raw = bool(getattr(transport, "accepts_raw", False))
        # CUDA: row copies are driver memcpys on the stream (no tensor view per row)
        self._ptrs = [[t.data_ptr() for t in lw] for lw in layers] if layers[0][0].is_cuda else None
        self.num_local = rows
        self.row_bytes = [[t[0].nbytes if rows else 0 for t in lw] for lw in layers]
        layer_bytes = max(sum(_align(b) for b in rb) for rb in self.row_bytes) * rows
        self._staging_auto = staging_bytes is None
        if staging_bytes is None:
            staging_bytes = layer_bytes
        if not isinstance(staging_bytes, int) or staging_bytes < 0:
            raise ValueError(f"staging_bytes must be a non-negative int, got {staging_bytes!r}")
        if not isinstance(pack_threshold, int) or pack_threshold < 0:
            raise ValueError(f"pack_threshold must be a non-negative int, got {pack_threshold!r}")
        if not isinstance(max_messages_per_round, int) or max_messages_per_round < 1:
            raise ValueError(f"max_messages_per_round must be a positive int, got {max_messages_per_round!r}")
        self.staging_bytes = staging_bytes
        self.pack_threshold = pack_threshold
        self.transactional = bool(transactional)
        self.max_messages = max_messages_per_round
        self.ranks_per_node = ranks_per_node
        if timeout is None:
            comm = getattr(transport, "comm", None)
            timeout = comm.timeout if comm is not None else 600.0
        self.timeout = float(timeout)
        self.device = layers[0][0].device
        self._is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._is_cuda else None
        self.profile = bool(profile) and self._is_cuda
        self._active: RearrangeHandle | None = None
        self._failed: BaseException | None = None
        self._size_cache: dict = {}
        if self._is_cuda:
            self._warm_up()
        self._pinned = None  # host buffer of row indices (CUDA), see _index_host
        self._pinned_free = None  # event after the last copy out of it

    # ------------------------------------------------------------------------------------
    def plan(self, old_map, new_map) -> RearrangementPlan:
        """The plan this shuffler would execute (pure; also validates the maps)."""
        return plan_rearrangement(old_map, new_map, self.ep_size, ranks_per_node=self.ranks_per_node)

    def rearrange(self, old_map, new_map, *, verify: bool = False, stream=None) -> RearrangeStats:
        """Move the experts so every rank holds what ``new_map`` assigns to its slots (in place).

        Synchronous: returns when every layer is done. ``stream`` (torch.cuda.Stream, default:
        the current stream) is where the switch to new weights is ordered; the exchange runs on
        the shuffler's own stream. Raises ValueError/TypeError before anything moves on bad
        input, RearrangeError (naming complete and still-old layers) on a failure mid-way.
        """
        h = self.rearrange_async(old_map, new_map, verify=verify, stream=stream)
        h.wait()
        return h.stats

    def rearrange_async(self, old_map, new_map, *, verify: bool = False, stream=None) -> RearrangeHandle:
        """Start a rearrangement and return at once; drive it with ``handle.step()`` between
        forward steps (same call order on every rank), or ``handle.wait()``.

        Forced transactional: live weights change only inside ``step()``/``wait()``, on the
        caller's stream, one whole layer at a time.
        """
        if self._failed is not None:
            raise RearrangeError(
                f"this shuffler's transport failed earlier ({self._failed!r}); make a new "
                "communicator and shuffler",
                cause=self._failed,
            )
        if self._active is not None and not self._active.done:
            raise RuntimeError("a rearrangement is already in progress on this shuffler; finish it first")
        t0 = time.perf_counter()
        plan, err = None, None
        try:
            plan = self.plan(old_map, new_map)
            if plan.num_layers != len(self.weights):
                raise ValueError(
                    f"old_map/new_map have {plan.num_layers} layers but expert_weights has {len(self.weights)}"
                )
            if plan.slots_per_rank != self.num_local:
                raise ValueError(
                    f"maps give {plan.slots_per_rank} slots per rank (num_physical {plan.num_physical} / "
                    f"ep_size {self.ep_size}) but the weight tensors have {self.num_local} expert rows"
                )
        except (ValueError, TypeError) as e:
            err = e
        planner_s = time.perf_counter() - t0
        if verify:
            # every rank joins, also one whose own checks failed: no peer is left waiting
            self._verify(old_map, new_map, err)
        if err is not None:
            raise err
        return RearrangeHandle(self, plan, planner_s, stream)

    def _verify(self, old_map, new_map, err: BaseException | None) -> None:
        """Collective: every rank's maps/ep_size/rows and weight shapes/dtypes must agree, and
        no rank may have refused the input; otherwise every rank raises ValueError (a rank
        that refused raises its own error). Nothing has moved yet."""
        maps = hashlib.sha256()
        shapes = hashlib.sha256()
        if err is None:
            try:
                maps.update(f"ep_size={self.ep_size};rows={self.num_local};".encode())
                maps.update(np.asarray(_host(old_map), dtype=np.int64).tobytes())
                maps.update(np.asarray(_host(new_map), dtype=np.int64).tobytes())
                for lw in self.weights:
                    for t in lw:
                        shapes.update(f"{tuple(t.shape)}:{t.dtype};".encode())
                    shapes.update(b"|")
            except (ValueError, TypeError) as e:
                err = e
        if err is not None:
            maps = shapes = hashlib.sha256(f"refused by rank {self.rank}: {err}".encode())
        everyone = self.transport.all_gather_bytes(maps.digest() + shapes.digest())
        if err is not None:
            raise err
        differ = []
        for name, part in (("old_map/new_map, ep_size or local expert rows", slice(0, 32)),
                           ("expert weight shapes/dtypes", slice(32, 64))):
            bad = [r for r, d in enumerate(everyone) if d[part] != everyone[self.rank][part]]
            if bad:
                differ.append(f"{name} (ranks {bad} differ from rank {self.rank})")
        if differ:
            raise ValueError(
                "verify=True: ranks disagree or refused the input: " + "; ".join(differ)
                + "; nothing was moved"
            )

    def _warm_up(self) -> None:
        """Run the gather/scatter kernels once on tiny tensors of every word type in use:
        with CUDA's lazy module loading their first launch costs ~10 ms each (~110 ms for the
        first rearrangement of a process, measured on H100), which belongs at set-up, not in
        the middle of serving. Small and large index counts use different kernels."""
        torch = self._torch
        dev = self.device
        for dtype in {b.dtype for lw in self._words for b in lw}:
            for k in (1, 32):
                ix = torch.arange(k, device=dev)
                rows = torch.zeros((k, 4), dtype=dtype, device=dev)
                out = torch.empty_like(rows)
                torch.index_select(rows, 0, ix, out=out)
                rows.index_copy_(0, ix, out)

    def _index_host(self, values: np.ndarray):
        """The row indices as an int64 host tensor; on CUDA in a pinned buffer kept by the
        shuffler (pinning a fresh one per rearrangement cost ~0.5 ms of host time), reused
        once the previous rearrangement's copy out of it has completed."""
        torch = self._torch
        values = values.astype(np.int64, copy=False)
        if not self._is_cuda:
            return torch.from_numpy(values)
        n = values.size
        buf = self._pinned
        if buf is None or buf.numel() < n:
            buf = self._pinned = torch.empty(max(n, 2 * (0 if buf is None else buf.numel()), 4096),
                                             dtype=torch.int64, pin_memory=True)
            self._pinned_free = None
        elif self._pinned_free is not None:
            self._pinned_free.synchronize()  # already complete unless a rearrangement was cut short
        buf[:n].numpy()[:] = values
        return buf[:n]

    # ---- round construction (pure given the plan; identical on every rank) --------------
    def _split(self, layer: int, packed: bool):
        """(tensors sent as their own messages, tensors packed per peer) of a layer."""
        rb = self.row_bytes[layer]
        if not packed:
            return list(range(len(rb))), []
        thr = self.pack_threshold
        return [i for i, b in enumerate(rb) if b >= thr], [i for i, b in enumerate(rb) if b < thr]

    def _sizes(self, packed: bool):
        """Per layer (arrays, fixed for this shuffler): aligned bytes of the tensors sent as
        their own messages, bytes and aligned bytes of the packed ones, and their counts."""
        out = self._size_cache.get(packed)
        if out is None:
            L = len(self.row_bytes)
            out = tuple(np.zeros(L, dtype=np.int64) for _ in range(5))
            big, small, small_al, nbig, nsmall = out
            for layer, rb in enumerate(self.row_bytes):
                b_ids, s_ids = self._split(layer, packed)
                big[layer] = sum(_align(rb[i]) for i in b_ids)
                small[layer] = sum(rb[i] for i in s_ids)
                small_al[layer] = sum(_align(rb[i]) for i in s_ids)
                nbig[layer], nsmall[layer] = len(b_ids), len(s_ids)
            self._size_cache[packed] = out
        return out

    def _rounds(self, plan: RearrangementPlan, transactional: bool):
        """Rounds of whole layers, identical on every rank (computed from the global plan).

        Per layer: packing is used when the layer has rows under ``pack_threshold`` and every
        rank's staging for it fits ``staging_bytes``; otherwise all its tensors travel as
        their own messages (staging then only holds rows that cannot be written in place,
        at most one layer). Returns (rounds, staging bytes per round, packed per layer, the
        bound in force: ``staging_bytes``, or with the default, more only if this
        rearrangement cannot be done within one layer of local experts).
        """
        P = plan.slots_per_rank
        L, n = plan.num_layers, plan.ep_size
        # The device index tensor (rows to gather/scatter) counts against the bound too:
        # reserve an upper bound that is the same on every rank (8 bytes per index, at most
        # two indices per transfer end and per local copy).
        ends = np.bincount(plan.t_src_rank, minlength=n) + np.bincount(plan.t_dst_rank, minlength=n)
        ends = ends + np.bincount(plan.c_rank, minlength=n)
        reserve = int(16 * ends.max()) if ends.size else 0
        budget = self.staging_bytes - reserve
        changed = plan.changed.reshape(L, n, P)
        needed = plan.source_needed.reshape(L, n, P)
        unsafe = changed if transactional else needed  # rows that may not be written before C
        tl, ts, td, tr = plan.t_layer, plan.t_src_rank, plan.t_dst_rank, plan.t_dst_row
        full = self._sizes(False)[0]  # aligned bytes of a whole row (every tensor on its own)
        cycles, tcount = _phase_c_copies(plan, transactional)
        stash = cycles * full[:, None]
        staged = unsafe[tl, td, tr] if tl.size else np.zeros(0, dtype=bool)
        key = _distinct((tl * n + ts) * n + td)  # (layer, src, dst) with transfers
        pairs = np.stack([key // (n * n), key // n % n, key % n])

        def needs(packed: bool):
            big, small, small_al, nbig, nsmall = self._sizes(packed)
            # stash rows, and the old content of small tensors' rows copied in phase C
            need = stash + tcount * small_al[:, None]
            msgs = np.zeros((L, n), dtype=np.int64)
            if tl.size:
                np.add.at(need, (tl[staged], td[staged]), big[tl[staged]])
                np.add.at(need, (tl, td), small[tl])  # packed receives
                np.add.at(need, (tl, ts), small[tl])  # packed sends
                np.add.at(msgs, (tl, ts), nbig[tl])
                np.add.at(msgs, (tl, td), nbig[tl])
                # packed parts: one message per (peer, small tensor) each way
                k = nsmall[pairs[0]]
                np.add.at(msgs, (pairs[0], pairs[1]), k)
                np.add.at(msgs, (pairs[0], pairs[2]), k)
                # alignment slack of packed blocks: one per (small tensor, direction) (the
                # bound used to count one per peer too; kept: it only over-reserves)
                need += np.where(need > 0, _ALIGN * 2 * n * nsmall[:, None], 0)
            return need, msgs

        need_p, msgs_p = needs(True)
        need_u, msgs_u = needs(False)
        has_small = self._sizes(True)[4] > 0
        packed = has_small & (need_p.max(axis=1) <= budget)
        need = np.where(packed[:, None], need_p, need_u)
        msgs = np.where(packed[:, None], msgs_p, msgs_u)
        worst = need.max(axis=1)
        active = np.flatnonzero(changed.reshape(L, -1).any(axis=1))
        if self._staging_auto and active.size and worst[active].max() > budget:
            # default bound (one layer of local experts) below this rearrangement's minimum:
            # only with tiny rows, where alignment and row indices dominate; use the minimum
            budget = int(worst[active].max())
        for layer in active:
            if worst[layer] > budget:
                r = int(need[layer].argmax())
                raise ValueError(
                    f"staging_bytes={self.staging_bytes} is too small: layer {layer} needs "
                    f"{int(worst[layer]) + self.staging_bytes - budget} bytes of staging on rank {r}"
                    + (" (transactional)" if transactional else "")
                    + "; raise staging_bytes (default: one layer of local experts)"
                )
        rounds = []
        cur: list[int] = []
        acc = np.zeros(n, dtype=np.int64)
        macc = np.zeros(n, dtype=np.int64)
        for layer in active:
            if cur and (
                (acc + need[layer]).max() > budget
                or (macc + msgs[layer]).max() > self.max_messages
            ):
                rounds.append(cur)
                cur, acc, macc = [], np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
            cur.append(int(layer))
            acc += need[layer]
            macc += msgs[layer]
        if cur:
            rounds.append(cur)
        round_need = [int(need[rl].sum(axis=0).max()) for rl in rounds]
        return rounds, round_need, packed, budget + reserve

    def _layer_works(self, plan, rv, layers, transactional: bool, packed) -> dict:
        """This rank's ops for each of ``layers`` (no staging offsets yet): layer -> _LayerWork.

        Sorting and run detection are done once over all layers (numpy); only the per-layer
        lists are built in Python.
        """
        P = plan.slots_per_rank
        nP = plan.ep_size * P
        # rows (of every rank) that may not be written before phase C, flat per layer
        unsafe_all = (plan.changed if transactional else plan.source_needed).reshape(-1)
        nbig = np.where(packed, self._sizes(True)[3], self._sizes(False)[3])
        has_big = nbig > 0
        # Per pair of ranks both sides list the transfers by (source row, destination row),
        # and a run of transfers from consecutive source rows, all received into staging,
        # travels as one message per tensor (k rows of the source tensor -> k staged rows).
        # The receiver's staging decision comes from the global plan, so the sender breaks
        # runs where the receiver does.
        sl, sp, ss, sd = rv.s_layer, rv.s_peer, rv.s_src_row, rv.s_dst_row
        o = np.lexsort((sd, ss, sp, sl))
        sl, sp, ss, sd = sl[o], sp[o], ss[o], sd[o]
        staged_s = unsafe_all[sl * nP + sp * P + sd] & has_big[sl]
        s_runs = _runs(sp, ss, staged_s, sl)
        rl, rp, rs, rd = rv.r_layer, rv.r_peer, rv.r_src_row, rv.r_dst_row
        o = np.lexsort((rd, rs, rp, rl))
        rl, rp, rs, rd = rl[o], rp[o], rs[o], rd[o]
        staged_r = unsafe_all[rl * nP + self.rank * P + rd] & has_big[rl]
        r_runs = _runs(rp, rs, staged_r, rl)
        o = np.argsort(rv.c_layer, kind="stable")
        cl, cs, cd, cn = rv.c_layer[o], rv.c_src_row[o], rv.c_dst_row[o], rv.c_src_is_new[o]
        # 0: duplicate of a new row (phase C last), 1: into a row nobody reads (phase A),
        # 2: old content into a row that is read or live (phase C first, ordered)
        ckind = np.where(cn, 0, np.where(unsafe_all[cl * nP + self.rank * P + cd], 2, 1))
        lay = np.asarray(layers, dtype=np.int64)
        # per layer: [start, end) of its transfers/copies, and of its runs
        sb, rb_, cb = (np.stack([np.searchsorted(x, lay), np.searchsorted(x, lay, side="right")], axis=1)
                       for x in (sl, rl, cl))
        s_starts, s_len = s_runs
        r_starts, r_len = r_runs
        srb = np.searchsorted(s_starts, sb).tolist()
        rrb = np.searchsorted(r_starts, rb_).tolist()
        sb, rb_, cb = sb.tolist(), rb_.tolist(), cb.tolist()
        sp_l, ss_l = sp.tolist(), ss.tolist()
        rp_l, rd_l, stg_l = rp.tolist(), rd.tolist(), staged_r.tolist()
        cs_l, cd_l, ck_l = cs.tolist(), cd.tolist(), ckind.tolist()
        s_starts, s_len, r_starts, r_len = s_starts.tolist(), s_len.tolist(), r_starts.tolist(), r_len.tolist()
        out = {}
        for k, layer in enumerate(layers):
            big, small = self._split(layer, bool(packed[layer]))
            a, b = sb[k]
            sends = list(zip(sp_l[a:b], ss_l[a:b]))
            i0, i1 = srb[k]
            send_msgs = [(sp_l[x], ss_l[x], n) for x, n in zip(s_starts[i0:i1], s_len[i0:i1])]
            a, b = rb_[k]
            recvs, recv_rows = [], []
            for peer, row, staged in zip(rp_l[a:b], rd_l[a:b], stg_l[a:b]):
                if staged:
                    recvs.append((peer, row, len(recv_rows)))
                    recv_rows.append(row)
                else:
                    recvs.append((peer, row, -1))
            i0, i1 = rrb[k]
            recv_msgs = [recvs[x - a] + (n,) for x, n in zip(r_starts[i0:i1], r_len[i0:i1])]
            a, b = cb[k]
            lists: tuple = ([], [], [])  # new, copies_a, to order
            for src, dst, kind in zip(cs_l[a:b], cd_l[a:b], ck_l[a:b]):
                lists[kind].append((src, dst))
            new, copies_a, tc = lists
            stash_src, copies_c = _order_copies(tc)
            send_pack: dict = {}
            recv_pack: dict = {}
            if small:
                for peer, src in sends:
                    send_pack.setdefault(peer, []).append(src)
                for peer, dst, _ in recvs:
                    recv_pack.setdefault(peer, []).append(dst)
            out[layer] = _LayerWork(
                layer, big, small, sends, recvs, recv_rows, copies_a, stash_src, copies_c, new,
                send_pack, recv_pack, send_msgs, recv_msgs,
            )
        return out


def _phase_c_copies(plan: RearrangementPlan, transactional: bool):
    """Per (layer, rank), from the global plan: (cycles among the old-content copies that
    phase C applies, i.e. stash rows; number of those copies). ``_layer_works`` executes
    exactly these on each rank."""
    L, n, P = plan.num_layers, plan.ep_size, plan.slots_per_rank
    cycles = np.zeros((L, n), dtype=np.int64)
    count = np.zeros((L, n), dtype=np.int64)
    cl, cr, cs, cd, cn = plan.c_layer, plan.c_rank, plan.c_src_row, plan.c_dst_row, plan.c_src_is_new
    if cl.size:
        unsafe = (plan.changed if transactional else plan.source_needed).reshape(L, n, P)
        tc = ~cn & unsafe[cl, cr, cd]
        parent = np.full(L * n * P, -1, dtype=np.int64)
        node = (cl * n + cr) * P
        parent[node[tc] + cd[tc]] = node[tc] + cs[tc]
        heads = _cycle_heads(parent)
        np.add.at(cycles, (heads // (n * P), heads // P % n), 1)
        np.add.at(count, (cl[tc], cr[tc]), 1)
    return cycles, count


def _cycle_heads(parent: np.ndarray) -> np.ndarray:
    """The smallest node of every cycle of ``parent`` (node -> node, -1: none), sorted.

    Pointer doubling: after ``2**J >= len`` steps a node's image is on a cycle (or is the
    sentinel for chains that end), every cycle node is such an image, and the running minimum
    along the path covers its whole cycle."""
    n = len(parent)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    p = np.append(np.where(parent >= 0, parent, n), n)  # sentinel n: the end of a chain
    mn = np.append(np.arange(n, dtype=np.int64), np.iinfo(np.int64).max)
    for _ in range(max(1, int(n - 1).bit_length()) + 1):
        mn = np.minimum(mn, mn[p])
        p = p[p]
    on_cycle = _distinct(p[:n][p[:n] != n])
    return on_cycle[mn[on_cycle] == on_cycle]


def _distinct(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D int array (np.unique without its lazy import of
    numpy.ma: ~0.1 s on the first call, which would land in the middle of serving)."""
    a = np.sort(a)
    if a.size:
        a = a[np.append(True, a[1:] != a[:-1])]
    return a


def _order_copies(copies: list):
    """Order old-content copies (src, dst) so every row is read before it is written.

    Rows form chains and cycles (a row is written by at most one copy); the smallest row of
    each cycle is saved first (the stash) and its readers read the saved copy. Returns
    (stash rows, [(src, j, dst)]) with j the stash index of src, or -1 to read row src.
    """
    if not copies:
        return [], []
    # cycles of dst -> src (a few rows: plain Python beats numpy calls here)
    parent = {dst: src for src, dst in copies}
    seen: dict = {}
    heads = []
    for start in parent:
        path = []
        x = start
        while x in parent and x not in seen:
            seen[x] = start
            path.append(x)
            x = parent[x]
        if seen.get(x) == start and x in parent:  # this walk closed a cycle at x
            heads.append(min(path[path.index(x) :]))
    stash = sorted(heads)
    slot = {r: j for j, r in enumerate(stash)}
    writer = {dst: k for k, (_, dst) in enumerate(copies)}
    readers: dict = {}
    for src, _ in copies:
        if src not in slot:
            readers[src] = readers.get(src, 0) + 1
    ready = [k for k, (_, dst) in enumerate(copies) if not readers.get(dst)]
    order = []
    while ready:
        k = ready.pop()
        src, dst = copies[k]
        order.append((src, slot.get(src, -1), dst))
        if src not in slot:
            readers[src] -= 1
            if readers[src] == 0 and src in writer:
                ready.append(writer[src])
    if len(order) != len(copies):  # cannot happen: one stash row per cycle breaks them all
        raise AssertionError(f"local copies could not be ordered: {copies}")
    return stash, order


def _runs(peer: np.ndarray, src: np.ndarray, staged: np.ndarray, layer: np.ndarray):
    """(starts, lengths) of the runs of a sorted transfer list: same layer and peer,
    consecutive source rows, every one staged; an unstaged transfer is a run of its own."""
    n = len(peer)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (
        (layer[1:] != layer[:-1]) | (peer[1:] != peer[:-1]) | (src[1:] != src[:-1] + 1)
        | ~staged[1:] | ~staged[:-1]
    )
    starts = np.flatnonzero(brk)
    return starts, np.diff(np.append(starts, n))


def _row_copies(ptrs: list, row_bytes: list, pairs: list) -> list:
    """(dst, src, nbytes) device copies of whole rows ``(src, dst)`` of every tensor of a
    layer, given the tensors' base pointers and row sizes."""
    return [(p + dst * n, p + src * n, n) for src, dst in pairs for p, n in zip(ptrs, row_bytes)]


def _mark(torch, stream):
    e = torch.cuda.Event(enable_timing=True)
    e.record(stream)
    return e


def _word_rows(torch, b):
    """``b`` ([rows, row_bytes] uint8) as [rows, k] of the widest integer type whose size
    divides the row length and the start address."""
    n = b.shape[1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if n % size == 0 and b.data_ptr() % size == 0:
            return b.view(dtype)
    return b


def _host(x):
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


class RearrangeHandle:
    """A rearrangement in progress (see :meth:`ExpertShuffler.rearrange_async`).

    ``step()`` launches and applies rounds; ``done``; ``wait(timeout)``; ``applied_layers``;
    ``stats``. After a failure every call raises the same :class:`RearrangeError`.
    """

    def __init__(self, shuffler: ExpertShuffler, plan: RearrangementPlan, planner_s: float, stream) -> None:
        self.s = shuffler
        self.plan = plan
        self.stats = RearrangeStats(planner_seconds=planner_s)
        self._t0 = time.perf_counter()
        t_setup = self._t0
        self._user_stream = stream
        rounds, needs, self._packed, bound = shuffler._rounds(plan, shuffler.transactional)
        self.stats.staging_bound = bound
        self._rounds = [_Round(i, rl) for i, rl in enumerate(rounds)]
        self.stats.rounds = len(rounds)
        self.stats.layers_changed = [l for rl in rounds for l in rl]
        self._next = 0  # next round to launch
        self._inflight: _Round | None = None
        self.applied_layers: list[int] = []
        self._error: RearrangeError | None = None
        self._rv = plan.rank_view(shuffler.rank)
        torch = shuffler._torch
        index_parts: list = []
        cap = 0
        works = shuffler._layer_works(
            plan, self._rv, [l for r in self._rounds for l in r.layers], shuffler.transactional, self._packed
        )
        for rnd in self._rounds:
            rnd.works = [works[l] for l in rnd.layers]
            cap = max(cap, self._layout(rnd.works, index_parts))
        self._staging = None
        self._idx = None
        self._idx_host = None
        if cap:
            self._staging = torch.empty(cap, dtype=torch.uint8, device=shuffler.device)
            if shuffler._stream is not None:
                self._staging.record_stream(shuffler._stream)
        if index_parts:
            # copied to the device by the first launch (non-blocking)
            self._idx_host = shuffler._index_host(np.concatenate(index_parts))
        self.stats.peak_extra_bytes = cap + (0 if self._idx_host is None else self._idx_host.numel() * 8)
        self._release = None  # event after the last consumer of staging
        shuffler._active = self
        self.stats.setup_seconds = time.perf_counter() - t_setup
        if not rounds:
            self._finish()

    # ---- public ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._next >= len(self._rounds) and self._inflight is None

    @property
    def pending_layers(self) -> list[int]:
        return [l for r in self._rounds if not r.done for l in r.layers]

    def step(self, wait: bool = False) -> list[int]:
        """Apply the layers whose data has arrived (on the caller's current stream) and launch
        the next round; returns the layers switched to new weights by this call.

        ``wait=False`` (default): never blocks; a round still in flight is left for a later
        call, so how far a rank has got depends on its timing. ``wait=True`` (lockstep): every
        call advances exactly one round: it waits (up to the timeout) for the round in flight,
        applies it and launches the next. Called at the same forward steps on every rank, the
        NCCL launches then come at the same point of every rank's launch sequence, which
        ``NCCL_LAUNCH_ORDER_IMPLICIT`` requires (README, threading model).
        """
        if wait:
            return self._lockstep()
        return self._advance(block=False)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Run to completion (blocking); returns the layers applied by this call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        applied = []
        while not self.done:
            applied += self._advance(block=True, deadline=deadline)
        if self.s._is_cuda:
            (self._user_stream or self.s._torch.cuda.current_stream(self.s.device)).synchronize()
        self.stats.seconds = time.perf_counter() - self._t0
        if self.s.profile:
            self.stats.gpu_ms = self._phase_times()
        return applied

    def _phase_times(self) -> dict:
        out = {"pack": 0.0, "exchange": 0.0, "apply": 0.0, "idle_after_exchange": 0.0, "idle_before_round": 0.0}
        prev = None
        for r in self._rounds:
            m = r.marks
            if not {"start", "packed", "apply", "end"} <= m.keys():
                continue
            out["pack"] += m["start"].elapsed_time(m["packed"])
            out["exchange"] += m["packed"].elapsed_time(r.event)
            out["idle_after_exchange"] += r.event.elapsed_time(m["apply"])
            out["apply"] += m["apply"].elapsed_time(m["end"])
            if prev is not None:
                out["idle_before_round"] += prev.elapsed_time(m["start"])
            prev = m["end"]
        return {k: round(v, 3) for k, v in out.items()}

    # ---- engine -----------------------------------------------------------------------------
    def _advance(self, block: bool, deadline: float | None = None) -> list[int]:
        def body():
            if self._inflight is None:
                self._launch_next()
            rnd = self._inflight
            applied = self._wait_and_apply(rnd, block, deadline) if rnd is not None else None
            if applied is None:
                return []
            self._launch_next()
            return applied

        return self._guarded(body)

    def _lockstep(self) -> list[int]:
        def body():
            rnd = self._inflight
            # blocking: returns the layers, or raises on timeout / peer error
            applied = self._wait_and_apply(rnd, True, None) if rnd is not None else []
            self._launch_next()
            return applied

        return self._guarded(body)

    def _guarded(self, body) -> list[int]:
        """Run one step of the engine; any failure becomes this handle's RearrangeError."""
        if self._error is not None:
            raise self._error
        try:
            applied = body()
            if self.done:
                self._finish()
            return applied
        except RearrangeError:
            raise
        except BaseException as e:
            self._fail(e)
            raise self._error from e

    def _launch_next(self) -> None:
        if self._next < len(self._rounds):
            self._launch(self._rounds[self._next])
            self._next += 1

    def _wait_and_apply(self, rnd: _Round, block: bool, deadline: float | None):
        """Apply ``rnd`` once it has arrived; returns its layers, or None if not yet."""
        t_wait = time.perf_counter()
        arrived = self._arrived(rnd, block, deadline)
        self.stats.wait_seconds += time.perf_counter() - t_wait
        if not arrived:
            return None
        t_apply = time.perf_counter()
        self._apply(rnd)
        self.stats.apply_seconds += time.perf_counter() - t_apply
        self._inflight = None
        return list(rnd.layers)

    def _fail(self, e: BaseException) -> None:
        rnd = self._inflight
        peers = set()
        if rnd is not None:
            for w in rnd.works:
                peers.update(p for p, _ in w.sends)
                peers.update(p for p, _, _ in w.recvs)
        partial = [] if self.s.transactional or rnd is None else list(rnd.layers)
        msg = f"rearrangement failed on rank {self.s.rank}: {type(e).__name__}: {e}"
        if partial:
            msg += f"; non-transactional mode: layers {partial} may be partly written"
        self._error = RearrangeError(msg, self.applied_layers, self.pending_layers, peers, e)
        self.s._failed = e
        self._staging = None
        self._idx = None
        self._inflight = None
        self.s._active = None

    def _finish(self) -> None:
        self._staging = None
        self._idx = None
        if self.s._active is self:
            self.s._active = None

    def _layout(self, works: list, index_parts: list) -> int:
        """Staging offsets and index ranges for one round's works; returns its staging bytes."""
        rb_all = self.s.row_bytes
        cursor = 0
        pos = sum(len(p) for p in index_parts)

        def take(n: int) -> int:
            nonlocal cursor
            off = cursor
            cursor += _align(n)
            return off

        def index(w, name, rows):
            nonlocal pos
            if rows:
                index_parts.append(np.asarray(rows, dtype=np.int64))
                w.idx[name] = (pos, len(rows))
                pos += len(rows)

        for w in works:
            rb = rb_all[w.layer]
            for i in w.big:
                if w.recv_rows:
                    w.recv_block[i] = take(len(w.recv_rows) * rb[i])
            for i in range(len(rb)):
                if w.stash_src:
                    w.stash_block[i] = take(len(w.stash_src) * rb[i])
            index(w, "recv", w.recv_rows)
            index(w, "stash_src", w.stash_src)
            if w.copies_c and w.small and not w.stash_src:
                for i in w.small:
                    w.copy_block[i] = take(len(w.copies_c) * rb[i])
                index(w, "c_src", [src for src, _, _ in w.copies_c])
                index(w, "c_dst", [dst for _, _, dst in w.copies_c])
            for tag, pack in (("s", w.send_pack), ("r", w.recv_pack)):
                if not pack:
                    continue
                spans, rows, first = [], [], 0
                for peer, pr in pack.items():
                    spans.append((peer, first, len(pr)))
                    rows += pr
                    first += len(pr)
                w.pack_spans[tag] = spans
                for i in w.small:
                    w.pack_block[(tag, i)] = take(first * rb[i])
                index(w, tag, rows)
        return cursor

    def _ix(self, w, name):
        start, n = w.idx[name]
        return self._idx[start : start + n]

    def _block(self, offset: int, rows: int, t):
        """A [rows, k] view of staging at ``offset`` shaped and typed like the rows of ``t``
        (a [rows, k] byte or word view of a weight)."""
        n = rows * t.shape[1] * t.element_size()
        return self._staging[offset : offset + n].view(t.dtype).view(rows, t.shape[1])

    def _launch(self, rnd: _Round) -> None:
        t_start = time.perf_counter()
        s = self.s
        torch = s._torch
        raw = s._raw
        sends, recvs, copies = [], [], []
        stream = s._stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            if stream is not None:
                if self._release is not None:
                    stream.wait_event(self._release)  # staging is free again
                else:  # first round: after the caller's earlier work on the weights
                    stream.wait_stream(self._user_stream or torch.cuda.current_stream(s.device))
            if self._idx is None and self._idx_host is not None:
                self._idx = self._idx_host.to(s.device, non_blocking=True)
                if stream is not None:
                    s._pinned_free = torch.cuda.Event()
                    s._pinned_free.record(stream)
            if s.profile:
                rnd.marks["start"] = _mark(torch, stream)
            st = self.stats
            sbase = self._staging.data_ptr() if self._staging is not None else 0
            for w in rnd.works:
                B = s._bytes[w.layer]  # [rows, row_bytes] uint8 views (messages)
                Wd = s._words[w.layer]  # the same rows as words (copy kernels)
                rb = s.row_bytes[w.layer]
                # A: local copies into rows nobody reads; save the rows that break copy cycles.
                if s._ptrs is not None:
                    ptrs = s._ptrs[w.layer]
                    copies += _row_copies(ptrs, rb, w.copies_a)
                else:
                    for src, dst in w.copies_a:
                        for b in B:
                            b[dst].copy_(b[src])
                if w.stash_src:
                    ix = self._ix(w, "stash_src")
                    for i, b in enumerate(Wd):
                        torch.index_select(b, 0, ix, out=self._block(w.stash_block[i], len(w.stash_src), b))
                if w.send_pack:
                    ix = self._ix(w, "s")
                    for i in w.small:
                        b = Wd[i]
                        torch.index_select(b, 0, ix, out=self._block(w.pack_block[("s", i)], len(ix), b))
                st.local_copies += len(w.copies_a) + len(w.copies_c) + len(w.copies_new)
                # B: rows straight from the weights; receives in place or into staging blocks.
                # per pair, both sides list messages run by run, tensor by tensor, then the
                # packed parts tensor by tensor
                if raw:
                    bases = [(B[i].data_ptr(), rb[i]) for i in w.big]
                    for peer, src, k in w.send_msgs:
                        sends.extend((peer, (base + src * n, k * n)) for base, n in bases)
                else:
                    for peer, src, k in w.send_msgs:
                        sends.extend((peer, B[i][src : src + k]) for i in w.big)
                for peer, dst, j, k in w.recv_msgs:
                    for i in w.big:
                        b, n = B[i], rb[i]
                        if j < 0:
                            recvs.append((peer, (b.data_ptr() + dst * n, n) if raw else b[dst]))
                        elif raw:
                            recvs.append((peer, (sbase + w.recv_block[i] + j * n, k * n)))
                        else:
                            recvs.append((peer, self._block(w.recv_block[i], len(w.recv_rows), b)[j : j + k]))
                for tag, out in (("s", sends), ("r", recvs)):
                    for peer, first, k in w.pack_spans.get(tag, ()):
                        for i in w.small:
                            a = w.pack_block[(tag, i)] + first * rb[i]
                            n = k * rb[i]
                            out.append((peer, (sbase + a, n) if raw else self._staging[a : a + n]))
                nrow = sum(rb)
                st.bytes_sent += nrow * len(w.sends)
                st.bytes_received += nrow * len(w.recvs)
                st.experts_sent += len(w.sends)
                st.experts_received += len(w.recvs)
            if copies:  # before the exchange: in-place receives may overwrite their sources
                _buffers.copy_async(copies, stream.cuda_stream)
            st.messages += len(sends) + len(recvs)
            if s.profile:
                rnd.marks["packed"] = _mark(torch, stream)
            s.transport.exchange(sends, recvs, stream)
            if stream is not None:
                rnd.event = torch.cuda.Event(enable_timing=s.profile)
                rnd.event.record(stream)
        rnd.launched_at = time.monotonic()
        self._inflight = rnd
        self.stats.launch_seconds += time.perf_counter() - t_start

    def _arrived(self, rnd: _Round, block: bool, deadline: float | None) -> bool:
        if rnd.event is None:
            return True  # host transport: exchange() returned complete
        s = self.s
        limit = rnd.launched_at + s.timeout
        if deadline is not None:
            limit = min(limit, deadline)
        delay = 2e-5
        while True:
            if rnd.event.query():
                return True
            poll = getattr(s.transport, "poll_error", None)
            if poll is not None:
                poll()
            if time.monotonic() > limit:
                abort = getattr(s.transport, "abort", None)
                if abort is not None:
                    abort()
                raise TimeoutError(
                    f"round {rnd.index} (layers {rnd.layers}) did not complete within "
                    f"{limit - rnd.launched_at:.1f} s; the transport was aborted"
                )
            if not block:
                return False
            time.sleep(delay)
            # short cap: every round's apply (and the next round) waits for the host to see it
            delay = min(delay * 2, 1e-4)

    def _apply(self, rnd: _Round) -> None:
        s = self.s
        torch = s._torch
        if s._is_cuda:
            cs = self._user_stream or torch.cuda.current_stream(s.device)
            cs.wait_event(rnd.event)
            if s.profile:
                rnd.marks["apply"] = _mark(torch, cs)
            ctx = torch.cuda.stream(cs)
        else:
            cs = None
            ctx = contextlib.nullcontext()
        sbase = self._staging.data_ptr() if self._staging is not None else 0
        with ctx:
            for w in rnd.works:
                B = s._words[w.layer]
                rb = s.row_bytes[w.layer]
                ptrs = s._ptrs[w.layer] if s._ptrs is not None else None
                # old-content copies first (their sources may be overwritten below): small
                # tensors gathered to staging and scattered back (two kernels each, any
                # order); the rest row by row in read-before-write order
                if w.copies_c:
                    nc = len(w.copies_c)
                    small = [(B[i], self._block(off, nc, B[i])) for i, off in w.copy_block.items()]
                    for b, blk in small:
                        torch.index_select(b, 0, self._ix(w, "c_src"), out=blk)
                    rows = [i for i in range(len(B)) if i not in w.copy_block]
                    if ptrs is not None:
                        copies = []
                        for src, j, dst in w.copies_c:
                            for i in rows:
                                n = rb[i]
                                at = ptrs[i] + src * n if j < 0 else sbase + w.stash_block[i] + j * n
                                copies.append((ptrs[i] + dst * n, at, n))
                        _buffers.copy_async(copies, cs.cuda_stream)
                    else:
                        blocks = {i: self._block(w.stash_block[i], len(w.stash_src), B[i]) for i in rows} if w.stash_src else {}
                        for src, j, dst in w.copies_c:
                            for i in rows:
                                b = B[i]
                                b[dst].copy_(b[src] if j < 0 else blocks[i][j])
                    for b, blk in small:
                        b.index_copy_(0, self._ix(w, "c_dst"), blk)
                if w.recv_rows:
                    ix = self._ix(w, "recv")
                    for i in w.big:
                        B[i].index_copy_(0, ix, self._block(w.recv_block[i], len(w.recv_rows), B[i]))
                if w.recv_pack:
                    ix = self._ix(w, "r")
                    for i in w.small:
                        B[i].index_copy_(0, ix, self._block(w.pack_block[("r", i)], len(ix), B[i]))
                if ptrs is not None and w.copies_new:
                    _buffers.copy_async(_row_copies(ptrs, rb, w.copies_new), cs.cuda_stream)
                else:
                    for src, dst in w.copies_new:
                        for b in B:
                            b[dst].copy_(b[src])
            if cs is not None:
                self._release = torch.cuda.Event(enable_timing=s.profile)
                self._release.record(cs)
                rnd.marks["end"] = self._release
                if self._idx is not None and rnd.index == 0:
                    self._idx.record_stream(cs)
        rnd.done = True
        self.applied_layers.extend(rnd.layers)
