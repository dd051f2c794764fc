"""A/B of C++ kernel *source versions* in one process: each version is built as its own extension,
then the steps alternate version by version, call by call, so a noisy machine slows all alike.
Before timing, every version's forward and fused backward (sgd, rowwise_adagrad) must give the
first version's bits (a kernel change that alters results fails here, not in a benchmark).

    python -m tools.cpu_kernel_ab NAME=SOURCE.cpp[:EXTRA_FLAG,...] ... -- SHAPES ITERS
    e.g.  git show HEAD~1:robe_torchrec/ops/csrc/robe_cpu.cpp > /tmp/old.cpp
          OMP_NUM_THREADS=2 python -m tools.cpu_kernel_ab old=/tmp/old.cpp \\
              new=robe_torchrec/ops/csrc/robe_cpu.cpp -- a,b,c 21

STEPS=forward,sgd,rowwise_adagrad,train_rowwise picks steps (default all; train_rowwise is a
forward then a fused row-wise Adagrad backward, so each leaves the caches to the other).
NOCHECK=1 skips the bit check (for deliberately inexact experiments). Shapes: bench.lookup's,
batch 2048, array 1000x smaller than the full tables, Z = 32.
"""
import os
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load

from robe_torchrec.bench.lookup import make_inputs, shapes
from robe_torchrec.hashing import table_key


def build(spec: str):
    name, rest = spec.split("=", 1)
    src, _, flags = rest.partition(":")
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off"] + (flags.split(",") if flags else [])
    return name, load(name=f"robe_ab_{name}", sources=[src], extra_cflags=cflags, extra_ldflags=["-fopenmp"])


def main(argv) -> None:
    sep = argv.index("--")
    builds = [build(spec) for spec in argv[:sep]]
    names, iters = argv[sep + 1].split(","), int(argv[sep + 2])
    selected = os.environ.get("STEPS")
    check = not os.environ.get("NOCHECK")
    for n in names:
        s = shapes(2048, False)[n]
        ids, offsets = make_inputs(s, torch.device("cpu"))
        m, Z = s.full_elements // 1000, 32
        keys = torch.tensor([table_key(0, f"t{t}") for t in range(s.tables)], dtype=torch.int64)
        mean = torch.zeros(s.tables, dtype=torch.bool)
        arr0 = torch.empty(m).uniform_(-0.01, 0.01)
        go = torch.randn(s.batch, s.tables * s.dim)

        def forward(mod, arr):
            return mod.pooled_forward(arr, ids, offsets, keys, mean, None, s.batch, s.dim, Z, m, 0, m)

        def backward(mod, arr, state, opt, lr):
            mod.pooled_backward_fused(go, arr, state, ids, offsets, keys, mean, None, s.batch, s.dim, Z, opt,
                                      lr, 1e-8, m, 0, m, -1)

        if check:
            first = forward(builds[0][1], arr0)
            for name, mod in builds[1:]:
                assert torch.equal(forward(mod, arr0), first), f"{name}: forward bits differ"
            for opt in ("sgd", "rowwise_adagrad"):
                results = []
                for name, mod in builds:
                    a, st = arr0.clone(), torch.zeros((m + Z - 1) // Z)
                    backward(mod, a, st, opt, 0.01)
                    results.append(a)
                for (name, _), a in zip(builds[1:], results[1:]):
                    assert torch.equal(a, results[0]), f"{name}: {opt} bits differ"

        arr, st = arr0.clone(), torch.zeros((m + Z - 1) // Z)
        steps = {
            "forward": lambda mod: forward(mod, arr0),
            "sgd": lambda mod: backward(mod, arr, st, "sgd", 1e-6),
            "rowwise_adagrad": lambda mod: backward(mod, arr, st, "rowwise_adagrad", 1e-6),
            "train_rowwise": lambda mod: (forward(mod, arr), backward(mod, arr, st, "rowwise_adagrad", 1e-6)),
        }
        for step, fn in steps.items():
            if selected and step not in selected.split(","):
                continue
            times = {name: [] for name, _ in builds}
            for it in range(iters + 2):
                for name, mod in builds:
                    t = time.perf_counter()
                    fn(mod)
                    if it >= 2:
                        times[name].append((time.perf_counter() - t) * 1e3)
            print(n, step, "  ".join(f"{name} {statistics.median(v):.2f} ms" for name, v in times.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
