"""RobeEmbeddingBagCollection under ``torchrec.fx.symbolic_trace`` (then ``torch.jit.script``).

Symbolic tracing hands the module a Proxy, on which the eager forward's checks and Python
dispatch cannot run. torchrec's own EmbeddingBagCollection traces through because its forward is
plain KJT method calls and ``nn.EmbeddingBag`` leaves; ours does the equivalent: the module's
forward calls :func:`robe_traced_lookup`, which ``torch.fx.wrap`` records as ONE ``call_function``
node. That function is TorchScript-able code over the KJT's methods and the ``robe::pooled_forward``
custom op (one call per group and dim run), so the traced graph runs in Python (dense gradients
through the op's registered autograd) and ``torch.jit.script`` compiles it.

The static description of the lookup (features, runs, hash keys, MEAN flags, kernel) is fixed at
trace time; the KJT's keys are matched by name at run time (any order; extra keys ignored).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.ops import library  # noqa: F401  (registers torch.ops.robe.pooled_forward)
from robe_torchrec.ops.api import mean_flags
from robe_torchrec.ops.lookup import dim_runs, resolve_kernel


def robe_traced_lookup(
    features: KeyedJaggedTensor,
    feature_names: List[str],
    weighted: bool,
    arrays: List[torch.Tensor],
    run_array: List[int],
    run_first: List[int],
    run_end: List[int],
    run_dim: List[int],
    run_keys: List[torch.Tensor],
    run_mean: List[torch.Tensor],
    block_sizes: List[int],
    num_elements: List[int],
    output_columns: List[int],
    kernel: str,
) -> torch.Tensor:
    """Pooled ``[B, sum(dims)]`` of ``features`` in torchrec's EBC column order.

    Run ``r`` pools canonical features ``[run_first[r], run_end[r])`` of dim ``run_dim[r]`` from
    ``arrays[run_array[r]]``; ``output_columns`` (empty: identity) reorders the canonical columns."""
    keys = features.keys()
    if keys != feature_names:
        for name in feature_names:
            if name not in keys:
                raise ValueError("KeyedJaggedTensor is missing configured feature " + name)
        features = features.permute([keys.index(name) for name in feature_names])
    batch_size = features.stride()
    ids = features.values().to(torch.int64)
    lengths = features.lengths()
    offsets = torch.cat(
        [torch.zeros(1, dtype=torch.int64, device=lengths.device), torch.cumsum(lengths, 0).to(torch.int64)]
    )
    weights: Optional[torch.Tensor] = None
    if weighted:
        weights = features.weights()
    outs: List[torch.Tensor] = []
    for r in range(len(run_array)):
        g = run_array[r]
        array = arrays[g]
        window = offsets[run_first[r] * batch_size : run_end[r] * batch_size + 1]
        pooled = torch.ops.robe.pooled_forward(
            array, ids, window, run_keys[r], run_mean[r], weights,
            batch_size, run_dim[r], block_sizes[g], num_elements[g], kernel,
        )
        outs.append(pooled.to(array.dtype))  # a bf16 / fp16 array's columns in its dtype, as eager
    out = torch.cat(outs, dim=1)
    if len(output_columns) > 0:
        out = out.index_select(1, torch.tensor(output_columns, dtype=torch.int64, device=out.device))
    return out


torch.fx.wrap("robe_traced_lookup")


def traced_forward(module: Any, features: Any) -> KeyedTensor:
    """The module's forward on an fx Proxy: one :func:`robe_traced_lookup` node, wrapped in the
    KeyedTensor torchrec's EBC returns. ``module`` is a RobeEmbeddingBagCollection."""
    if module._fused_optimizer is not None and module.training:
        raise NotImplementedError(
            "fx tracing a RobeEmbeddingBagCollection with a fused optimizer in training mode would drop the "
            "optimizer step from the graph; call .eval() to trace for inference (or train without fx)"
        )
    arrays = [module.arrays[g] for g in module._layouts]  # Proxies of the parameters (get_attr nodes)
    device = module.device  # the arrays' device; theirs would be a Proxy here
    run_array, run_first, run_end, run_dim, run_keys, run_mean = [], [], [], [], [], []
    block_sizes, num_elements, first = [], [], 0
    for g, (group, layout) in enumerate(module._layouts.items()):
        keys = module._host_hash_keys[group].to(device)
        for f0, f1 in dim_runs(layout.dims):
            run_array.append(g)
            run_first.append(first + f0)
            run_end.append(first + f1)
            run_dim.append(layout.dims[f0])
            run_keys.append(keys[f0:f1].clone())
            run_mean.append(mean_flags(layout.mean[f0:f1], device).clone())
        block_sizes.append(layout.block_size)
        num_elements.append(layout.num_elements)
        first += layout.num_features
    columns: List[int] = []
    if module._needs_output_permute:
        widths = [module._lengths_per_embedding[s] for s in module._output_slots]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        by_slot = sorted(range(len(widths)), key=lambda i: module._output_slots[i])
        columns = [c for i in by_slot for c in range(starts[i], starts[i] + widths[i])]
    kernel = resolve_kernel(module.kernel, device)
    values = robe_traced_lookup(
        features, list(module._input_features), module.is_weighted(), arrays, run_array, run_first, run_end,
        run_dim, run_keys, run_mean, block_sizes, num_elements, columns, kernel,
    )
    return KeyedTensor(keys=module._embedding_names, length_per_key=module._lengths_per_embedding, values=values)
