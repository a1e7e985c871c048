"""sae_train's Matryoshka BatchTopK and text-only training (training.modalities)."""

from __future__ import annotations

import pytest
import torch

from tests.test_sae_training import planted_activations
from xmodal.errors import ConfigError
from xmodal.sae_train import SAETrainConfig, modality_batches
from xmodal.saes.training import default_matryoshka_widths, train_topk_sae


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_matryoshka_batchtopk_trains_and_loads_as_a_local_sae(tmp_path):
    from xmodal.saes.loading import local_sae

    acts = planted_activations()
    sae = train_topk_sae(acts, layer=3, d_sae=64, k=4, total_samples=40 * len(acts), batch_size=256, lr=4e-3, seed=0, architecture="matryoshka_batchtopk")
    assert sae.cfg.matryoshka_widths == [8, 16, 32, 64] == default_matryoshka_widths(64)
    sae.save_inference_model(tmp_path / "sae")
    features = local_sae("local", str(tmp_path / "sae"), 3, device="cpu")  # what sae=local loads
    codes = features.encode(acts)
    fve = 1 - ((features.decode(codes) - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    assert fve > 0.8, f"fraction of variance explained {fve:.3f}"
    assert (codes > 0).sum(dim=1).float().mean() <= 8


class FakeStore:
    """Two shards of 300 rows, a third of them text (modality 0), the rest image (1)."""

    def __init__(self) -> None:
        self.rows = [torch.arange(300 * i, 300 * (i + 1), dtype=torch.float32)[:, None].repeat(1, 4) for i in range(2)]
        self.modality = [(torch.arange(300) % 3 != 0).to(torch.uint8) for _ in range(2)]

    def shard(self, index: int, layer: int):
        return self.rows[index], self.modality[index]


def test_text_only_batches_hold_only_text_rows():
    store = FakeStore()
    text_ids = {int(v) for i in range(2) for v in store.rows[i][store.modality[i] == 0, 0]}
    batches = modality_batches(store, 9, [0], batch_size=64, seed=0, shards=[0, 1], buffer_shards=1)
    seen = [int(v) for _ in range(6) for v in next(batches)[:, 0]]
    assert set(seen) <= text_ids and len(set(seen)) > 150  # text rows only, from both shards


@pytest.mark.parametrize(
    "training, message",
    [
        (dict(modalities=[]), "training.modalities=[] trains on nothing"),
        (dict(matryoshka_widths=[64, 128]), "training.matryoshka_widths=[64, 128] must rise strictly from at least 1 and end at training.d_sae=512"),
    ],
)
def test_bad_training_options_are_refused_before_anything_loads(training, message):
    cfg = SAETrainConfig()
    for key, value in training.items():
        setattr(cfg.training, key, value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.validate()
