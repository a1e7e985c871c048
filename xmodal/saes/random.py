"""A random SAE of a trained SAE's architecture and width, matched to it in L0: the null of SAE evaluation.

Random SAEs score close to trained ones on several benchmarks (arXiv 2602.14111), so every
SAE metric here is reported beside this one. Its decoder rows are random unit directions, its
encoder their transpose (tied), its decoder bias the mean of the tokens it is scored on (the
first thing any SAE learns), and its sparsity that of the trained SAE on those same tokens:
TopK keeps the same k; a thresholded SAE (JumpReLU, BatchTopK and Matryoshka saved as JumpReLU)
gets one threshold for all features, set so its mean L0 equals the trained SAE's; a ReLU SAE the
same as an encoder bias.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


@torch.inference_mode()
def random_sae_like(sae: Any, rows: torch.Tensor, target_l0: float, seed: int) -> Any:
    """A copy of `sae` (same class and config) with random tied weights and the L0 `target_l0` on `rows`."""
    null = copy.deepcopy(sae)
    d_sae, d_in = null.W_dec.shape
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=generator), dim=1)
    device, dtype = null.W_dec.device, null.W_dec.dtype
    null.W_dec.copy_(directions.to(device, dtype))
    null.W_enc.copy_(directions.T.to(device, dtype))
    null.b_dec.copy_(rows.float().mean(dim=0).to(device, dtype))
    null.b_enc.zero_()
    if hasattr(null.cfg, "k") and not hasattr(null, "threshold"):
        return null  # TopK: the same k
    # One cut for all features: the (1 - L0/d_sae) quantile of the codes with no cut, on `rows`.
    if hasattr(null, "threshold"):
        null.threshold.zero_()
    sample = rows[torch.randperm(len(rows), generator=generator)[: max(1, QUANTILE_LIMIT // d_sae)]]
    uncut = null.encode(sample.to(device, dtype)).float().flatten()
    cut = float(torch.quantile(uncut, 1 - min(target_l0, d_sae) / d_sae))
    if hasattr(null, "threshold"):
        null.threshold.fill_(cut)
    else:
        null.b_enc.fill_(-cut)  # ReLU: codes relu(pre - cut)
    return null


QUANTILE_LIMIT = 2**24 - 1  # torch.quantile's input size limit
