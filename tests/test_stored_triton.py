"""Serving formats in the Triton bag kernel (``ops.triton.pooled_forward_stored``) against the float32
reference lookup of the array they stand for.

float32 / bfloat16 / float16 arrays are upcast on load: the result must equal the float32 kernel on
the upcast array exactly (same summation order). int8 (FBGEMM's row-wise scheme on the [ceil(m/Z), Z]
view) is dequantised per element, code * scale + bias: the result must match the reference lookup
of ``dequantize_rowwise_int8`` within float32 rounding (a GPU may contract to an FMA). Cases include
blocks wrapping at m, a partial last Z-chunk, MEAN and weighted bags. Without CUDA the kernels run
in Triton's interpreter; the ``cuda`` variants (marked gpu) also check the serving op's dispatch.
"""

import pytest
import torch

from tests.test_ops_triton import batch_of, device, make_case, tk  # noqa: F401
from robe_torchrec.ops import reference as ref  # noqa: E402
from robe_torchrec.ops.stored_lookup import dequantize_rowwise_int8, quantize_rowwise_int8  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
NAMES = ["wrap_z4", "partial_chunk", "z1", "m_eq_z"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", NAMES)
def test_float_formats_equal_the_float32_kernel_on_the_upcast_array(device, name, dtype):
    k = make_case(name, device)
    data = (k["array"] * 0.1).to(dtype)
    got = tk.pooled_forward_stored(data, None, batch_of(k))
    assert torch.equal(got, tk.pooled_forward(data.float(), batch_of(k)))
    torch.testing.assert_close(got.cpu(), ref.pooled_forward(data.float().cpu(), batch_of({**k, **_cpu(k)})), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_int8_equals_the_reference_on_the_dequantised_array(device, name):
    k = make_case(name, device)
    codes, scale_bias = quantize_rowwise_int8(k["array"].cpu() * 0.1, k["Z"])
    want = ref.pooled_forward(dequantize_rowwise_int8(codes, scale_bias, k["Z"]), batch_of({**k, **_cpu(k)}))
    got = tk.pooled_forward_stored(codes.to(device), scale_bias.to(device), batch_of(k))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


def test_int8_inputs_are_checked():
    k = make_case("wrap_z4", torch.device("cpu"))
    codes, sb = quantize_rowwise_int8(k["array"], k["Z"])
    with pytest.raises(ValueError, match=r"scale_bias must have shape \[10, 2\]"):
        tk.pooled_forward_stored(codes, sb[:-1], batch_of(k))
    with pytest.raises(TypeError, match="uint8 tensor of codes"):
        tk.pooled_forward_stored(codes.to(torch.int32), sb, batch_of(k))


@pytest.mark.gpu
def test_serving_op_dispatches_to_triton_on_cuda(monkeypatch):
    """robe::pooled_lookup_stored on CUDA tensors (the Triton path) equals its PyTorch math."""
    from robe_torchrec.ops.stored_lookup import pooled_lookup_stored

    k = make_case("wrap_z4", torch.device("cuda"))
    codes, sb = quantize_rowwise_int8(k["array"].cpu() * 0.1, k["Z"])
    lengths = (k["offsets"][1:] - k["offsets"][:-1]).to(torch.int64)
    args = (codes.cuda(), sb.cuda(), k["indices"], lengths, k["weights"], k["hash_keys"], k["mean"],
            [k["D"]] * k["F"], [0] * k["F"], [k["m"]], [k["Z"]], [0], [0])
    got = pooled_lookup_stored(*args)
    monkeypatch.setenv("ROBE_STORED_LOOKUP_REFERENCE", "1")
    torch.testing.assert_close(got, pooled_lookup_stored(*args), rtol=1e-5, atol=1e-6)


def _cpu(k):
    return {key: v.cpu() for key, v in k.items() if isinstance(v, torch.Tensor)}
