import json, os, sys, time
import numpy as np, torch
import eplb_pynccl as ep
from bench import hostfree
dev = torch.device("cuda", 0)
rows = hostfree.nccl_pair_rows(torch, ep, dev, 0, 5)
for r in rows: print(r)
json.dump(rows, open(os.environ.get("OUT", "/tmp") + "/pair.json", "w"), indent=1)
