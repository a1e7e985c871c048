"""How well an SAE reconstructs each modality: fraction of variance explained, L0, dead features."""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def sae_quality(sae: Any, x: torch.Tensor, modality: dict[str, torch.Tensor], chunk: int = 8192) -> list[dict[str, Any]]:
    """One row per modality (`modality`: name -> boolean mask over the rows of `x`).

    FVE = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2, within the modality; L0 = features
    active per token; the dead fraction is over all rows of every modality together.
    """
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    reconstruction, active = [], []
    for part in x.split(chunk):
        codes = sae.encode(part.to(device, dtype))
        reconstruction.append(sae.decode(codes).float().cpu())
        active.append((codes > 0).cpu())
    x_hat, on = torch.cat(reconstruction), torch.cat(active)
    dead = float(1 - on.any(dim=0).float().mean())
    rows = []
    for name, mask in modality.items():
        xs, rs = x[mask].float(), x_hat[mask]
        rows.append({
            "tokens": name, "n_tokens": int(mask.sum()),
            "fve": float(1 - (xs - rs).pow(2).sum() / (xs - xs.mean(dim=0)).pow(2).sum()) if len(xs) else float("nan"),
            "l0": float(on[mask].sum(dim=1).float().mean()) if len(xs) else float("nan"),
            "dead_fraction": dead, "d_sae": int(on.shape[1]),
        })  # fmt: skip
    return rows
