"""Ad hoc bench parts for tests/test_bench_cli.py (``--parts tests.bench_parts:NAME``)."""

from __future__ import annotations

import os
import time


def die_while_peer_is_busy(ctx):
    """Rank 1 exits with code 9 while rank 0 is busy with local work for 2 minutes (as a
    rank filling its weights is: it meets no collective that would tell it). The dying rank
    writes the time it dies to ``$EPLB_PYNCCL_TEST_DEATH_STAMP`` where that is set."""
    if ctx.rank == 1:
        time.sleep(0.5)
        stamp = os.environ.get("EPLB_PYNCCL_TEST_DEATH_STAMP")
        if stamp:
            with open(stamp, "w") as f:
                f.write(repr(time.time()))
        os._exit(9)
    time.sleep(120)
    return [{"never": 1}]
