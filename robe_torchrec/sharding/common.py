"""What the per-type shardings (dp.py, tw.py, rw.py) share: the context, the interface, a lookup.

Each sharding owns, for the groups of its type, the input dist (``input_dist`` returns what
torchrec's own sharding types return: ``Awaitable[Awaitable[KJT]]``, or whatever a pipeline's
replacement ``KJTAllToAll`` forward returns, untouched, so ``_fuse_input_dist_splits`` can fuse
it), the lookup (``compute``) and the output dist (``output_dist``: an awaitable of
``{group: [B, D_group]}``, waited only when the module's output is needed).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar

import torch
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.streamable import Multistreamable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.modules.robe_embedding_bag_collection import _offsets_of
from robe_torchrec.ops.lookup import robe_pooled_lookup
from robe_torchrec.sharding.groups import Group

T = TypeVar("T")
U = TypeVar("U")


class RobeShardingContext(Multistreamable):
    """Per-batch context: the local batch size and, for MEAN row-wise groups, bag lengths [F, B]."""

    def __init__(self) -> None:
        self.batch_size: int = 0
        self.lengths: Dict[str, torch.Tensor] = {}

    def record_stream(self, stream: Optional[torch.Stream]) -> None:
        for t in self.lengths.values():
            t.record_stream(stream)  # type: ignore[arg-type]


class MapAwaitable(Awaitable[U], Generic[T, U]):
    """``fn(awaitable.wait())``, computed when waited (keeps the collective in flight until then)."""

    def __init__(self, awaitable: Awaitable[T], fn: Callable[[T], U]) -> None:
        super().__init__()
        self._awaitable = awaitable
        self._fn = fn

    def _wait_impl(self) -> U:
        return self._fn(self._awaitable.wait())


class RobeSharding:
    """Base of the per-type shardings (see the module docstring). Plain object, not an nn.Module:
    it holds no parameters, and the arrays stay the sharded module's (unsharded state-dict keys)."""

    sharding_type: str = ""

    def __init__(self, groups: List[Group], hash_keys: Dict[str, torch.Tensor], kernel: str, is_weighted: bool) -> None:
        self.groups = groups
        self.names = [g.name for g in groups]
        self._hash_keys = hash_keys
        self._kernel = kernel
        self._is_weighted = is_weighted
        # Canonical feature indices of these groups, in group order.
        self.feature_order: List[int] = [i for g in groups for i in range(*g.feature_range)]

    def select(self, features: KeyedJaggedTensor, num_features: int) -> KeyedJaggedTensor:
        """This sharding's features of a canonical-order KJT (no copy when it has all of them)."""
        if self.feature_order == list(range(num_features)):
            return features
        return features.permute(self.feature_order)

    def input_dist(self, ctx: RobeShardingContext, features: KeyedJaggedTensor) -> Any:
        raise NotImplementedError

    def compute(self, ctx: RobeShardingContext, kjt: KeyedJaggedTensor, arrays: nn.ParameterDict, fused: Optional[Any]) -> torch.Tensor:
        raise NotImplementedError

    def output_dist(self, ctx: RobeShardingContext, output: torch.Tensor) -> Awaitable[Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def split_by_group(self, pooled: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{group: columns}`` of a ``[B, sum of these groups' dims]`` tensor."""
        if len(self.groups) == 1:
            return {self.names[0]: pooled}
        return dict(zip(self.names, pooled.split([g.layout.total_dim for g in self.groups], dim=1)))

    def lookup(self, g: Group, kjt: KeyedJaggedTensor, arrays: nn.ParameterDict, fused: Optional[Any]) -> torch.Tensor:
        """Pooled ``[kjt.stride(), D_group]`` of one whole array with the module's kernel."""
        values = kjt.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        return robe_pooled_lookup(
            arrays[g.name],
            ids,
            _offsets_of(kjt),
            g.layout,
            self._hash_keys[g.name],
            kjt.stride(),
            kjt.weights_or_none() if self._is_weighted else None,
            kernel=self._kernel,
            fused_optimizer=fused,
        )
