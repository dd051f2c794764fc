"""The byte counter of the comm benchmark (robe_torchrec.bench.comm_count) on known collectives.

2 gloo processes; every expected byte count is worked out by hand from the split sizes below,
not by the counter's own helpers. Also the formula helper of robe_torchrec.bench.comm_bytes on
hand-evaluated numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from robe_torchrec.bench.comm_bytes import formulas
from robe_torchrec.bench.comm_count import CommCounter, count_ddp_allreduce
from tests.test_sharding_harness import get_pool


def _known_collectives(rank: int, world_size: int) -> Dict[str, Any]:
    original = dist.all_to_all_single
    # rank 0 sends rows [2 to itself, 3 to rank 1]; rank 1 sends [4 to rank 0, 1 to itself].
    in_splits = [[2, 3], [4, 1]][rank]
    out_splits = [[2, 4], [3, 1]][rank]
    ids = torch.arange(5, dtype=torch.int64) + 100 * rank
    got_ids = torch.empty(sum(out_splits), dtype=torch.int64)
    rows = torch.full((5, 3), float(rank))  # float32 rows of 12 bytes
    got_rows = torch.empty(sum(out_splits), 3)
    even = torch.arange(6, dtype=torch.int32)  # no split sizes: 3 + 3 elements of 4 bytes
    got_even = torch.empty(6, dtype=torch.int32)
    grad = torch.ones(10)
    with CommCounter() as counter:
        counter.phase = "a"
        dist.all_to_all_single(got_ids, ids, out_splits, in_splits)  # positional
        dist.all_to_all_single(output=got_rows, input=rows, output_split_sizes=out_splits, input_split_sizes=in_splits)
        counter.phase = "b"
        dist.all_to_all_single(got_even, even)
        dist.all_reduce(grad)
        patched = dist.all_to_all_single is not original
    restored = dist.all_to_all_single is original
    expect_rows = torch.cat([torch.full((out_splits[0], 3), 0.0), torch.full((out_splits[1], 3), 1.0)])
    expect_ids = torch.tensor([0, 1, 100, 101, 102, 103] if rank == 0 else [2, 3, 4, 104])
    return {
        "records": [(r.op, r.phase, r.dtype, r.raw, r.sent, r.recv, r.rows_in) for r in counter.records],
        "totals_a": counter.total(phase="a"),
        "data_ok": bool(torch.equal(got_ids, expect_ids)) and bool(torch.equal(got_rows, expect_rows))
        and bool(torch.equal(grad, torch.full((10,), 2.0))),
        "patched": patched,
        "restored": restored,
    }


def test_counts_all_to_all_single_and_all_reduce_bytes_by_hand():
    r0, r1 = get_pool(2).run(_known_collectives)
    for r in (r0, r1):
        assert r["patched"] and r["restored"] and r["data_ok"]
    i64, f32 = torch.int64, torch.float32
    # rank 0: sends 3 rows to rank 1, receives 4 from it; rank 1 the other way round.
    assert r0["records"] == [
        ("all_to_all_single", "a", i64, 5 * 8, 3 * 8, 4 * 8, 5),
        ("all_to_all_single", "a", f32, 5 * 12, 3 * 12, 4 * 12, 5),
        ("all_to_all_single", "b", torch.int32, 6 * 4, 3 * 4, 3 * 4, 6),
        ("all_reduce", "b", f32, 40, 40.0, 40.0, 0),  # ring: 2 (W-1)/W * 40 = 40
    ]
    assert r1["records"][:2] == [
        ("all_to_all_single", "a", i64, 5 * 8, 4 * 8, 3 * 8, 5),
        ("all_to_all_single", "a", f32, 5 * 12, 4 * 12, 3 * 12, 5),
    ]
    assert r0["totals_a"] == {"calls": 2, "raw": 100.0, "sent": 60.0, "recv": 80.0, "rows_in": 10.0}


def _torchrec_kjt_all_to_all(rank: int, world_size: int) -> List[Any]:
    from torchrec.distributed.dist_data import KJTAllToAll
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    # Feature f0 goes to rank 0, f1 to rank 1. Batch 3 per rank; f1's bags on rank 0 hold 1+0+2
    # ids, on rank 1 f0's bags hold 2+2+1.
    lengths = [[1, 1, 1, 1, 0, 2], [2, 2, 1, 0, 1, 0]][rank]
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.arange(sum(lengths), dtype=torch.int64),
                            lengths=torch.tensor(lengths, dtype=torch.int64))
    with CommCounter() as counter:
        out = KJTAllToAll(dist.group.WORLD, [1, 1])(kjt).wait().wait()
    assert out.keys() == [["f0"], ["f1"]][rank]
    return [(r.label, r.dtype, r.sent, r.recv) for r in counter.records]


def test_labels_torchrec_kjt_all_to_all_tensors():
    r0, r1 = get_pool(2).run(_torchrec_kjt_all_to_all)
    by_label0 = {label: (sent, recv) for label, _, sent, recv in r0}
    by_label1 = {label: (sent, recv) for label, _, sent, recv in r1}
    # values: rank 0 sends f1's 3 ids, receives f0's 5 ids from rank 1 (8 bytes each).
    assert by_label0["values"] == (3 * 8, 5 * 8) and by_label1["values"] == (5 * 8, 3 * 8)
    # lengths: each rank sends the other feature's 3 bag lengths (int64).
    assert by_label0["lengths"] == (3 * 8, 3 * 8)
    assert "splits" in by_label0


def _ddp_hooked(rank: int, world_size: int) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 2))
    assert count_ddp_allreduce(model) == 1
    with CommCounter() as counter:
        model(torch.ones(4, 3)).sum().backward()
    return [(r.op, r.raw) for r in counter.records]


def test_ddp_bucket_all_reduce_is_counted():
    r0, _ = get_pool(2).run(_ddp_hooked)
    assert r0 == [("all_reduce", (6 + 2) * 4)]  # weight 2x3 + bias 2, float32, one bucket


def test_formulas_by_hand():
    # W=2, B=10, P=3, F=2, D=8, Z=4: k = 2 (1 - 1/2^2) = 1.5
    rw = formulas("row_wise", 2, 10, 3.0, 2, 8, 4, 1000)
    assert rw["ids (KJT values, int64)"] == pytest.approx(8 * 10 * 3 * 1.5 * 0.5)
    assert rw["pooled values (fwd)"] == 4 * 1 * 10 * 2 * 8 and rw["KJT lengths"] == 8 * 1 * 10 * 2
    tw = formulas("table_wise", 2, 10, 3.0, 2, 8, 4, 1000)
    assert tw["ids (KJT values, int64)"] == pytest.approx(120) and tw["pooled values (fwd)"] == pytest.approx(320)
    assert formulas("data_parallel", 4, 10, 3.0, 2, 8, 4, 1000) == {"array gradient all-reduce": pytest.approx(6000)}
    with pytest.raises(ValueError, match="unknown sharding type"):
        formulas("column_wise", 2, 10, 3.0, 2, 8, 4, 1000)
