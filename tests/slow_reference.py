"""Slow, obviously-correct ROBE math for tests: Python loops over features, bags, ids and elements.

Independent of robe_torchrec's vectorised code: only the scalar spec of the hash is shared
(it is pinned by golden vectors in test_hashing.py).
"""

from typing import Dict, List, Optional

import torch

from robe_torchrec.hashing import block_offset_scalar, table_key


def embedding_row(array: List[float], seed: int, table: str, idx: int, dim: int, z: int) -> List[float]:
    """The D-dim embedding of id ``idx``: element j reads M[(h(t, idx, j // Z) + j % Z) mod m]."""
    m = len(array)
    key = table_key(seed, table)
    return [array[(block_offset_scalar(key, idx, j // z, m) + j % z) % m] for j in range(dim)]


def pooled_slow(
    array: torch.Tensor,
    seed: int,
    block_size: int,
    features: List[Dict],
    batch_size: int,
) -> torch.Tensor:
    """features: [{"table", "dim", "mean", "ids": [[...] per bag], "weights": [[...]] or None}].

    Returns [B, sum dims] in the order of ``features``.
    """
    arr = array.detach().double().tolist()
    cols = []
    for feat in features:
        out = torch.zeros(batch_size, feat["dim"], dtype=torch.float64)
        for b in range(batch_size):
            ids = feat["ids"][b]
            for i, idx in enumerate(ids):
                w = 1.0 if feat.get("weights") is None else feat["weights"][b][i]
                row = embedding_row(arr, seed, feat["table"], idx, feat["dim"], block_size)
                out[b] += w * torch.tensor(row, dtype=torch.float64)
            if feat["mean"] and ids:
                out[b] /= len(ids)
        cols.append(out)
    return torch.cat(cols, dim=1)


def bags_of(kjt, key: str) -> List[List[int]]:
    jt = kjt[key]
    return [t.tolist() for t in jt.to_dense()]


def weights_of(kjt, key: str) -> Optional[List[List[float]]]:
    jt = kjt[key]
    if jt.weights_or_none() is None:
        return None
    return [t.tolist() for t in jt.to_dense_weights()]
