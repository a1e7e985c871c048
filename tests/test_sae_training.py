"""Training SAEs with sae-lens on activations in memory: both architectures learn and load back."""

from __future__ import annotations

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.saes.training import train_topk_sae


def planted_activations(n: int = 4000, d_in: int = 32, n_atoms: int = 48, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Rows that are sparse sums of `active` of `n_atoms` random directions, plus a shared mean."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d_in, generator=generator), dim=-1)
    codes = torch.zeros(n, n_atoms)
    for row in range(n):
        chosen = torch.randperm(n_atoms, generator=generator)[:active]
        codes[row, chosen] = 1 + torch.rand(active, generator=generator)
    return codes @ atoms + 2.0 * torch.ones(d_in)


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
@pytest.mark.parametrize("architecture,decoder_init", [("topk", "data"), ("topk", "random"), ("batchtopk", "data"), ("jumprelu", "data")])
def test_trained_sae_reconstructs_and_loads_with_sae_lens(architecture, decoder_init, tmp_path):
    from sae_lens import SAE

    acts = planted_activations()
    sae = train_topk_sae(
        acts,
        layer=3,
        d_sae=64,
        k=4,
        total_samples=40 * len(acts),
        batch_size=256,
        lr=4e-3,
        seed=0,
        architecture=architecture,
        decoder_init=decoder_init,
    )
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae", device="cpu")
    with torch.no_grad():
        codes = loaded.encode(acts)
        error = ((loaded.decode(codes) - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    assert 1 - error.item() > 0.8, f"fraction of variance explained {1 - error.item():.3f}"
    assert (codes > 0).sum(dim=1).float().mean() <= 8  # sparse: about k per row


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="architecture='gated'"):
        train_topk_sae(torch.zeros(10, 4), 0, 8, 2, 10, 5, 1e-3, 0, architecture="gated")


def test_bad_decoder_init_is_refused():
    with pytest.raises(ValueError, match="decoder_init='pca'"):
        train_topk_sae(torch.zeros(10, 4), 0, 8, 2, 10, 5, 1e-3, 0, decoder_init="pca")
    with pytest.raises(ConfigError, match="at least training.d_sae=8 activation rows"):
        train_topk_sae(torch.zeros(4, 4), 0, 8, 2, 10, 5, 1e-3, 0, decoder_init="data")
