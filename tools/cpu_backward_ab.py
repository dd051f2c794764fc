"""A/B of the CPU fused backward's two index preparations (ROBE_CPU_BACKWARD=map / records), alternating
call by call in one process, so a noisy shared machine slows both alike.

    python -m tools.cpu_backward_ab a,b,c [iters]
"""
import os, statistics, sys, time
import torch
from robe_torchrec.bench.lookup import make_inputs, shapes
from robe_torchrec.hashing import table_key
from robe_torchrec.ops import cpu
from robe_torchrec.ops.api import LookupBatch, OptimizerArgs

iters = int(sys.argv[2]) if len(sys.argv) > 2 else 10
for n in sys.argv[1].split(","):
    s = shapes(2048, False)[n]
    ids, offsets = make_inputs(s, torch.device("cpu"))
    m = s.full_elements // 1000
    keys = torch.tensor([table_key(0, f"t{t}") for t in range(s.tables)], dtype=torch.int64)
    b = LookupBatch(indices=ids, offsets=offsets, hash_keys=keys, mean=torch.zeros(s.tables, dtype=torch.bool),
                    weights=None, batch_size=s.batch, dim=s.dim, block_size=32, num_elements=m)
    arr = torch.empty(m).uniform_(-0.01, 0.01)
    go = torch.randn(s.batch, s.tables * s.dim)
    for opt in ("sgd", "rowwise_adagrad"):
        st = torch.zeros(0) if opt == "sgd" else torch.zeros((m + 31) // 32)
        oa = OptimizerArgs(opt, st, 0.01, 1e-8)
        ts = {"map": [], "records": []}
        for it in range(iters + 2):
            for mode in ts:
                os.environ["ROBE_CPU_BACKWARD"] = mode
                t = time.perf_counter(); cpu.pooled_backward_fused(go, arr, b, oa); dt = (time.perf_counter() - t) * 1e3
                if it >= 2:
                    ts[mode].append(dt)
        print(n, opt, "  ".join(f"{k} med {statistics.median(v):.2f} min {min(v):.2f}" for k, v in ts.items()), flush=True)
