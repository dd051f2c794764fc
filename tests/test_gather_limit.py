"""The gather-ceiling benchmark kernel computes what it claims (so its GB/s are a real ceiling).

Checked against plain PyTorch indexing on tiny shapes, in Triton's interpreter without CUDA.
"""

import importlib
import os

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from robe_torchrec.ops import triton as tk  # noqa: E402

if not _HAS_CUDA and not tk.interpreted() and os.environ.get("TRITON_INTERPRET") == "1":
    tk = tk.reload()
if not _HAS_CUDA and not tk.interpreted():
    pytest.skip("no CUDA and the Triton kernels are compiled for a GPU", allow_module_level=True)

import robe_torchrec.bench.gather_limit as gl  # noqa: E402

gl = importlib.reload(gl)  # decorate its kernel in the same mode as the package's
DEVICE = torch.device("cuda" if _HAS_CUDA else "cpu")


def _manual(array, ids, offsets, f, b, dim, z):
    """Bag by bag, block by block, element by element."""
    nb, span = dim // z, array.numel() - z
    out = torch.zeros(b, f * dim, dtype=torch.float64)
    for feat in range(f):
        for bag in range(b):
            g = feat * b + bag
            for pos in range(int(offsets[g]), int(offsets[g + 1])):
                x = int(ids[pos])
                for c in range(nb):
                    s = (((x * nb + c) * 2654435761) % 2**64) & (span - 1)
                    for k in range(z):
                        out[bag, feat * dim + c * z + k] += float(array[s + k])
    return out


@pytest.mark.parametrize("dim,z,lengths", [(8, 4, [1, 2, 0, 3, 1, 1]), (12, 4, [2, 1, 1, 1, 0, 4]), (8, 8, [1] * 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_bags_matches_manual_sum(dim, z, lengths, dtype):
    g = torch.Generator().manual_seed(dim + z)
    f, b = 2, 3
    array = torch.randn(64 + z, generator=g).to(dtype)
    lens = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    ids = torch.randint(0, 10**12, (int(lens.sum()),), generator=g)
    expect = _manual(array.float(), ids, offsets, f, b, dim, z)
    got = gl.gather_bags(array.to(DEVICE), ids.to(DEVICE), offsets.to(DEVICE), f, b, dim, z, block_bags=2)
    torch.testing.assert_close(got.cpu().double(), expect, rtol=1e-5, atol=1e-5)
    ref = gl.gather_reference(array, ids, offsets, f, b, dim, z)
    torch.testing.assert_close(ref.double(), expect, rtol=1e-5, atol=1e-5)


def test_gather_array_size_is_checked():
    with pytest.raises(ValueError, match="2\\*\\*p \\+ Z"):
        gl.gather_bags(torch.zeros(100, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE),
                       torch.tensor([0, 1], device=DEVICE), 1, 1, 4, 4)


@pytest.mark.skipif(_HAS_CUDA, reason="the quick mode is the CPU smoke run")
def test_quick_run_prints_both_sides(capsys):
    rows = gl.run(["--quick", "--shapes", "a", "--dtypes", "float32"])
    assert len(rows) == 1 and rows[0]["robe_ms"] is not None and rows[0]["ceiling_ms"] > 0
    assert "ROBE / ceiling" in capsys.readouterr().out
