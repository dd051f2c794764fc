"""bfloat16 / float16 arrays in the Triton kernels (interpreter on CPU, compiled on a GPU).

The kernels load the array as float32 (``.to(tl.float32)``) and the fused update stores its float32
result rounded to nearest even (``.to(array dtype)``), so on the same inputs they must equal the
float32 kernels on the upcast array, rounded. Stochastic rounding is a CPU-kernel option only; the
Triton fused step refuses it for reduced arrays. Helpers and set-up (TRITON_INTERPRET=1 before the
kernels are imported) come from tests/test_ops_triton.py.
"""

import pytest
import torch

from tests.test_ops_triton import OPTIMIZERS, batch_of, device, initial_state, make_case, tk  # noqa: F401
from robe_torchrec.ops import reference as ref  # noqa: E402
from robe_torchrec.ops.api import OptimizerArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
LOW = [torch.bfloat16, torch.float16]


def _ids(x) -> str:
    return str(x).replace("torch.", "")


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("name", ["wrap_z4", "partial_chunk"])
def test_forward_reads_reduced_arrays_in_float32(device, name, dtype):
    k = make_case(name, device)
    low = (k["array"] * 0.1).to(dtype)
    got = tk.pooled_forward(low, batch_of(k))
    assert got.dtype == torch.float32
    assert torch.equal(got, tk.pooled_forward(low.float(), batch_of(k)))
    torch.testing.assert_close(got, ref.pooled_forward(low.float(), batch_of(k)), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_step_rounds_the_float32_step(device, optimizer, dtype):
    k = make_case("wrap_z4", device)
    low = (k["array"] * 0.1).to(dtype)
    state0 = initial_state(k, optimizer, device)
    a, s = low.clone(), state0.clone()
    tk.pooled_backward_fused(k["grads"][0], a, batch_of(k), OptimizerArgs(optimizer, s, 0.05, 1e-6))
    a32, s32 = low.float(), state0.clone()
    tk.pooled_backward_fused(k["grads"][0], a32, batch_of(k), OptimizerArgs(optimizer, s32, 0.05, 1e-6))
    assert a.dtype == dtype and s.dtype == torch.float32
    # the same float32 step up to the atomics' summation order, then one rounding to nearest
    torch.testing.assert_close(a.float(), a32.to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    torch.testing.assert_close(s, s32, rtol=2e-5, atol=2e-6)
    # and the reference's bf16 step (float32 math, rounded) agrees to one rounding step
    r, rs = low.clone(), state0.clone()
    ref.pooled_backward_fused(k["grads"][0], r, batch_of(k), OptimizerArgs(optimizer, rs, 0.05, 1e-6))
    torch.testing.assert_close(a.float(), r.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_refuses_stochastic_rounding_and_other_dtypes(device):
    k = make_case("wrap_z4", device)
    with pytest.raises(NotImplementedError, match="stochastic rounding"):
        tk.pooled_backward_fused(
            k["grads"][0], k["array"].bfloat16(), batch_of(k), OptimizerArgs("sgd", torch.empty(0, device=device), 0.1, rounding_seed=3)
        )
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        tk.pooled_forward(k["array"].double(), batch_of(k))
