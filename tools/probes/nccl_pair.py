"""Device probe: a 4 KiB self send/recv pair through ours (blocking, non-blocking) and cupy."""

import json
import os

import torch

import eplb_pynccl as ep
from bench import hostfree

dev = torch.device("cuda", 0)
rows = hostfree.nccl_pair_rows(torch, ep, dev, 0, 5)
for r in rows:
    print(r)
with open(os.environ.get("OUT", "/tmp") + "/pair.json", "w") as f:
    json.dump(rows, f, indent=1)
