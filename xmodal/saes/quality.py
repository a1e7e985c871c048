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
        rows.append(
            {
                "tokens": name,
                "n_tokens": int(mask.sum()),
                "fve": float(1 - (xs - rs).pow(2).sum() / (xs - xs.mean(dim=0)).pow(2).sum()) if len(xs) else float("nan"),
                "l0": float(on[mask].sum(dim=1).float().mean()) if len(xs) else float("nan"),
                "dead_fraction": dead,
                "d_sae": int(on.shape[1]),
            }
        )
    return rows


DENSE_FRACTION = 0.1  # a feature active on more than this share of tokens counts as dense (SAEBench)


@torch.inference_mode()
def encode_decode(sae: Any, x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) of the rows of `x`, on the CPU in float32."""
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    codes, reconstruction = [], []
    for part in x.split(chunk):
        c = sae.encode(part.to(device, dtype))
        codes.append(c.float().cpu())
        reconstruction.append(sae.decode(c).float().cpu())
    return torch.cat(codes), torch.cat(reconstruction)


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor, dense_fraction: float = DENSE_FRACTION) -> dict[str, float]:
    """SAELens/SAEBench's core metrics of one set of tokens (rows of `x`, reconstructed as `x_hat`).

    explained_variance = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2 (the mean over these rows);
    mse per element; cossim and l2_ratio = |x_hat| / |x| averaged over tokens; l0 = active features
    per token; frac_dead / frac_dense = features active on no token / on more than `dense_fraction`
    of these tokens.
    """
    x, x_hat = x.float(), x_hat.float()
    if not len(x):
        return dict.fromkeys(("explained_variance", "mse", "cossim", "l2_ratio", "l0", "frac_dead", "frac_dense"), float("nan"))
    error = (x - x_hat).pow(2)
    active = codes > 0
    firing = active.float().mean(dim=0)
    return {
        "explained_variance": float(1 - error.sum() / (x - x.mean(dim=0)).pow(2).sum()),
        "mse": float(error.mean()),
        "cossim": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean()),
        "l2_ratio": float((x_hat.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean()),
        "l0": float(active.sum(dim=1).float().mean()),
        "frac_dead": float((firing == 0).float().mean()),
        "frac_dense": float((firing > dense_fraction).float().mean()),
    }
