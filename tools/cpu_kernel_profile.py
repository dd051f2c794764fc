"""Times the C++ kernel's forward and fused backward alone on bench.lookup's shapes a, b, c.

    python -m tools.cpu_kernel_profile a,b,c [iters]    (ROBE_CPU_PROFILE=1 prints the C++ phase times)
"""
import statistics, sys, time
import torch
from robe_torchrec.bench.lookup import make_inputs, shapes
from robe_torchrec.hashing import table_key
from robe_torchrec.ops import cpu
from robe_torchrec.ops.api import LookupBatch, OptimizerArgs

def med(fn, iters):
    ts = []
    for _ in range(2):
        fn()
    for _ in range(iters):
        t = time.perf_counter(); fn(); ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), min(ts), max(ts)

names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["a", "b", "c"]
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 10
for n in names:
    s = shapes(2048, False)[n]
    ids, offsets = make_inputs(s, torch.device("cpu"))
    m = s.full_elements // 1000
    keys = torch.tensor([table_key(0, f"t{t}") for t in range(s.tables)], dtype=torch.int64)
    b = LookupBatch(indices=ids, offsets=offsets, hash_keys=keys, mean=torch.zeros(s.tables, dtype=torch.bool),
                    weights=None, batch_size=s.batch, dim=s.dim, block_size=32, num_elements=m)
    arr = torch.empty(m).uniform_(-0.01, 0.01)
    go = torch.randn(s.batch, s.tables * s.dim)
    print(n, "forward ms (med, min, max) %.2f %.2f %.2f" % med(lambda: cpu.pooled_forward(arr, b), iters))
    for opt in ("sgd", "rowwise_adagrad"):
        st = torch.zeros(0) if opt == "sgd" else torch.zeros((m + 31) // 32)
        oa = OptimizerArgs(opt, st, 0.01, 1e-8)
        print(n, opt, "fused backward ms %.2f %.2f %.2f" % med(lambda: cpu.pooled_backward_fused(go, arr, b, oa), iters))
