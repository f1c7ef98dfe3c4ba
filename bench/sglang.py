"""SGLang's own _update_expert_weights_raw vs eplb_pynccl's (installed), same maps, same 4 gloo
processes: median time per update and our peak extra memory as a fraction of SGLang's (one
full layer of temp buffers). Run with .venv-sglang: ``.venv-sglang/bin/python -m bench.sglang``
(prints the reason and exits 0 where SGLang does not import). Not registered in bench/run.py yet.
"""

import sys
import time

import numpy as np

from tests.gpu_util import RankPool


def job(ctx, source):
    import torch
    from sglang.srt.eplb import expert_location_updater as U

    from eplb_pynccl import shuffler as SH
    from eplb_pynccl.integrations import sglang as S
    from tests_sglang.util import metadata, sequence, world

    rank, ws = world(ctx)
    L, P = 8, 8
    N = P * ws
    E = N - ws
    if source == "random":
        maps = sequence(1, 3, L, E, N)
    else:
        from sglang.srt.eplb import eplb_algorithms as A
        from sglang.srt.eplb import expert_location as el

        rng = np.random.default_rng(0)
        base = rng.gamma(0.7, size=(L, E))
        cur = np.stack([np.arange(N) % E] * L)
        maps = [cur]
        if source == "ours":
            S.install(policy="migration_aware")
        for _ in range(3):
            el.set_global_expert_location_metadata(
                metadata(torch, cur, E, ws), allow_overwrite=True
            )
            base = base * rng.lognormal(0, 0.2, size=base.shape)
            cur = (
                A.rebalance_experts(
                    torch.from_numpy((base * 1000).astype(np.int64))[None],
                    N,
                    P,
                    None,
                    1,
                    A.EplbAlgorithm.deepseek,
                )[0]
                .numpy()
                .astype(np.int64)
            )
            maps.append(cur)
        S.uninstall()
    metas = [metadata(torch, m, E, ws) for m in maps]
    w = [[torch.randn(P, 256, 128), torch.randn(P, 128, 128)] for _ in range(L)]
    layer_bytes = sum(t.nbytes for t in w[0])
    d = {i: w[i] for i in range(L)}
    out = {}
    for mode in ("sglang", "ours"):
        if mode == "ours":
            S.install()
        ts = []
        peaks = []
        orig = SH.ExpertShuffler.rearrange

        def rec(self, *a, **k):
            st = orig(self, *a, **k)
            peaks.append(st.peak_extra_bytes)
            return st

        SH.ExpertShuffler.rearrange = rec
        for a, b in zip(metas, metas[1:]):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            U._update_expert_weights_raw(d, a, b, list(range(L)), 1, rank)
            torch.distributed.barrier()
            ts.append(time.perf_counter() - t0)
        SH.ExpertShuffler.rearrange = orig
        S.uninstall()
        out[mode] = (float(np.median(ts)), max(peaks) if peaks else layer_bytes)
    out["layer_bytes"] = layer_bytes
    out["changed"] = float(np.mean([(x != y).mean() for x, y in zip(maps, maps[1:])]))
    return out


if __name__ == "__main__":
    try:
        import sglang.srt.eplb.expert_location_updater  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"sglang bench skipped: SGLang's EPLB modules do not import ({e})")
        sys.exit(0)
    pool = RankPool(4, env={"SGLANG_USE_CPU_ENGINE": "1"})
    for src in ("random", "deepseek", "ours"):
        r = pool.run(job, src, timeout=300)[0]
        ratio = r["ours"][0] / r["sglang"][0]
        print(
            f"{src}: slots changed {r['changed']:.2f}, time per update sglang "
            f"{r['sglang'][0]:.3f} s, ours {r['ours'][0]:.3f} s (ratio {ratio:.2f}), "
            f"our peak extra / SGLang's layer {r['ours'][1] / r['layer_bytes']:.2f}",
            flush=True,
        )
    pool.close()
