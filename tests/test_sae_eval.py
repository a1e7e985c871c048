"""experiment=sae_eval: per-modality reconstruction and splice scores of an SAE, beside L0-matched random SAEs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from xmodal.activations.cache import ActivationCache
from xmodal.config import PositionsConfig
from xmodal.experiments.base import RunContext
from xmodal.experiments.sae_eval import splice as S
from xmodal.experiments.sae_eval.config import SAEEvalConfig
from xmodal.experiments.sae_eval.experiment import SAEEval
from xmodal.reporting.results import ResultWriter
from xmodal.saes.loading import local_sae
from xmodal.saes.quality import encode_decode, reconstruction_metrics
from xmodal.saes.random import random_sae_like

LAYER = 2


def topk_sae(d_in: int = 64, d_sae: int = 128, k: int = 8, layer: int = LAYER):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=f"model.layers.{layer}")))


@pytest.fixture(scope="module")
def answers(tiny, synthetic):
    images = [img.load() for img in synthetic.images[:3]]
    texts = [next(c.text for c in synthetic.concepts if c.name == img.concept) for img in synthetic.images[:3]]
    return S.answer_batch(tiny, images, texts, "", use_chat_template=True)


def test_identity_scores_one_and_zero_ablation_scores_zero(tiny, answers):
    """SAELens's scores: a perfect SAE (the identity) keeps CE and KL at the clean run's, zero-ablation is the floor."""
    assert answers.predicts.sum() == len(answers.targets) > 0 and not (answers.image & answers.text).any()
    hooks_before = set(tiny.decoder_layers()[LAYER]._forward_hooks)  # transformers may keep its own output-capturing hook
    clean = S.answer_logprobs(tiny, answers, LAYER)
    ce_clean = S.cross_entropy(clean, answers.targets)
    for site in S.SPLICE_SITES:
        zeroed = S.answer_logprobs(tiny, answers, LAYER, S.zero, site)
        same = S.answer_logprobs(tiny, answers, LAYER, S.identity, site)
        ce_zero, kl_zero = S.cross_entropy(zeroed, answers.targets), S.kl_from_clean(clean, zeroed)
        assert kl_zero > 0 and ce_zero != ce_clean  # ablating `site` changes the answer's distribution
        ce_same, kl_same = S.cross_entropy(same, answers.targets), S.kl_from_clean(clean, same)
        assert S.ce_loss_score(ce_clean, ce_same, ce_zero) == pytest.approx(1.0, abs=1e-5)
        assert S.kl_div_score(kl_same, kl_zero) == pytest.approx(1.0, abs=1e-5)
        assert S.ce_loss_score(ce_clean, ce_zero, ce_zero) == 0.0 and S.kl_div_score(kl_zero, kl_zero) == 0.0
    assert set(tiny.decoder_layers()[LAYER]._forward_hooks) == hooks_before  # the splice hook is gone after each pass


def test_reconstruction_metrics_of_a_perfect_and_a_mean_reconstruction():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    codes = torch.zeros(200, 10)
    codes[:, 0] = 1.0  # feature 0 fires on every token (dense), 1..9 never (dead)
    perfect = reconstruction_metrics(x, x, codes)
    assert perfect["explained_variance"] == pytest.approx(1.0) and perfect["mse"] == 0 and perfect["cossim"] == pytest.approx(1.0)
    assert perfect["l2_ratio"] == pytest.approx(1.0) and perfect["l0"] == 1 and perfect["frac_dead"] == pytest.approx(0.9)
    assert perfect["frac_dense"] == pytest.approx(0.1)
    mean = reconstruction_metrics(x, x.mean(dim=0).expand_as(x), codes)
    assert mean["explained_variance"] == pytest.approx(0.0, abs=1e-6) and mean["l2_ratio"] < 1


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_random_null_has_the_architecture_width_and_l0_of_the_trained_sae(architecture):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    rows = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    sae = topk_sae()
    if architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=128))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.2)
            sae.threshold.fill_(0.3)
    target = reconstruction_metrics(rows, *encode_decode(sae, rows)[::-1])["l0"]
    before = sae.W_enc.clone()
    null = random_sae_like(sae, rows, target, seed=0)
    assert type(null) is type(sae) and null.W_dec.shape == sae.W_dec.shape
    assert not torch.equal(null.W_enc, sae.W_enc) and torch.equal(sae.W_enc, before)  # the trained SAE is untouched
    l0 = reconstruction_metrics(rows, *encode_decode(null, rows)[::-1])["l0"]
    assert l0 == pytest.approx(target, rel=0.02), (l0, target)
    other = random_sae_like(sae, rows, target, seed=1)
    assert not torch.equal(other.W_dec, null.W_dec)  # each null draw is its own random SAE


def test_sae_eval_writes_every_metric_per_modality_beside_its_null(tiny, synthetic, tmp_path):
    """The study in process on the tiny model: the metric keys the sweep report draws against layer."""
    sae_dir = tmp_path / "sae"
    topk_sae(d_in=tiny.hidden_size).save_model(sae_dir)
    features = local_sae("local", str(sae_dir), LAYER, device="cpu")
    ctx = RunContext(
        model=tiny,
        features=features,
        dataset=synthetic,
        layer=LAYER,
        seed=0,
        positions=PositionsConfig(batch_size=4),
        cache=ActivationCache(tmp_path / "cache"),
        writer=ResultWriter(tmp_path / "run"),
        progress=False,
    )
    metrics = SAEEval(SAEEvalConfig(n_images=3, answer="concept", n_random_saes=3)).run(ctx)
    for prefix in ("image", "text"):
        for name in ("explained_variance", "mse", "cossim", "l2_ratio", "l0", "frac_dead", "frac_dense"):
            key = f"{prefix}_{name}"
            assert {key, f"{key}_null_mean", f"{key}_null_q025", f"{key}_null_q975", f"{key}_p"} <= set(metrics), key
    for site in ("image", "text", "both"):
        for name in ("ce_loss_score", "kl_div_score"):
            assert f"{site}_{name}_null_mean" in metrics and 0 < metrics[f"{site}_{name}_p"] <= 1
    assert metrics["image_l0"] == metrics["image_l0_null_mean"] == 8  # TopK: the null keeps k
    assert metrics["text_explained_variance_null_n"] == 3 and metrics["n_answer_tokens"] > 0
    assert (tmp_path / "run" / "figures" / "metrics_by_modality.png").stat().st_size > 10_000
    from xmodal.reporting.sweep import metrics_with_null

    curves = set(metrics_with_null(pd.DataFrame([metrics])))  # what a -m layer=... sweep draws against layer
    assert {"image_explained_variance", "text_explained_variance", "image_ce_loss_score", "both_kl_div_score"} <= curves


def test_sae_eval_refuses_no_sae_and_bad_settings():
    from xmodal.errors import ConfigError

    with pytest.raises(ConfigError, match="experiment.dense_fraction=1.5"):
        SAEEval(SAEEvalConfig(dense_fraction=1.5))
    with pytest.raises(ConfigError, match="experiment.n_random_saes=0 must be at least 1"):
        SAEEval(SAEEvalConfig(n_random_saes=0))
    with pytest.raises(ConfigError, match=r"experiment.splice_sites=\[\] splices nowhere"):
        SAEEval(SAEEvalConfig(splice_sites=[]))
    with pytest.raises(ConfigError, match="experiment.splice_sites='pixels'; use image, text or both"):
        SAEEval(SAEEvalConfig(splice_sites=["pixels"]))
