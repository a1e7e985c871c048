"""Splice an SAE into the forward pass: resid_post of one decoder layer replaced by a function of
itself (the SAE's reconstruction, zeros, ...) at chosen positions, and the next-token loss on an
answer that follows the image measured against the clean run (SAELens's CE and KL scores).

Like steering (xmodal/activations/steering.py), this needs its own forward passes with a hook;
the answer is teacher-forced after the prompt, so one pass scores every answer token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from xmodal.activations.capture import output_replaced
from xmodal.models.base import HookPoint, ModelAdapter

Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # (n, d_model) -> (n, d_model)
SPLICE_SITES = ("image", "text", "both")


@dataclass
class AnswerBatch:
    """Prompts with an image and a teacher-forced answer after them, right-padded."""

    inputs: dict[str, Any]
    predicts: torch.Tensor  # (batch, seq) bool: positions whose next token is an answer token
    targets: torch.Tensor  # (n predicted positions,): those next tokens
    image: torch.Tensor  # (batch, seq) bool: image soft tokens
    text: torch.Tensor  # (batch, seq) bool: every other real token but the first (BOS stays clean)


def answer_batch(adapter: ModelAdapter, images: Sequence[Any], answers: Sequence[str], prompt: str, use_chat_template: bool) -> AnswerBatch:
    """The user turn (image, then `prompt`) and, in the model's turn, each image's answer."""
    processor = adapter.processor
    processor.tokenizer.padding_side = "right"  # real positions as in an unpadded pass
    rendered = adapter.render_prompt(prompt, True, use_chat_template)
    add_special = adapter._adds_bos(rendered)
    encoded = processor(
        text=[rendered + answer for answer in answers],
        images=[[img.convert("RGB")] for img in images],
        return_tensors="pt",
        padding=True,
        add_special_tokens=add_special,
    )
    prompt_len = len(processor(text=[rendered], images=[[images[0].convert("RGB")]], add_special_tokens=add_special)["input_ids"][0])
    ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
    positions = torch.arange(ids.shape[1])
    # position p predicts token p + 1: answer tokens are the real tokens from prompt_len on
    predicts = (positions[None, :] >= prompt_len - 1) & attention.roll(-1, dims=1) & (positions[None, :] < ids.shape[1] - 1)
    targets = ids.roll(-1, dims=1)[predicts]
    image = adapter.image_token_mask(ids)
    text = attention & ~image & (positions[None, :] > 0)
    return AnswerBatch(dict(encoded), predicts, targets, image, text)


def spliced(decoder_layer: nn.Module | HookPoint, reconstruct: Reconstruct, mask: torch.Tensor) -> ContextManager[None]:
    """Within the block, the output of `decoder_layer` (or the site a HookPoint names) at `mask` (batch, seq)
    is `reconstruct` of itself."""

    def splice(hidden: torch.Tensor) -> torch.Tensor:
        new, where = hidden.clone(), mask.to(hidden.device)
        new[where] = reconstruct(hidden[where]).to(hidden.dtype)
        return new

    return output_replaced(decoder_layer, splice)


@torch.inference_mode()
def answer_logprobs(
    adapter: ModelAdapter, batch: AnswerBatch, layer: int, reconstruct: Reconstruct | None = None, site: str = "both", sae_site: str = "resid_post"
) -> torch.Tensor:
    """log p(next token) at the answer's positions, (n predicted positions, vocab), float32 on the CPU;
    with `reconstruct`, `sae_site` (resid_post, mlp_out, attn_out) of `layer` is replaced by it at the
    tokens of `site` (image, text or both)."""
    if site not in SPLICE_SITES:
        raise ValueError(f"splice site {site!r}; use one of {SPLICE_SITES}")
    inputs = {k: v.to(adapter.device) if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
    mask = {"image": batch.image, "text": batch.text, "both": batch.image | batch.text}[site]
    if reconstruct is None:
        logits = adapter.model(**inputs, use_cache=False).logits
    else:
        with spliced(adapter.hook_point(layer, sae_site), reconstruct, mask):
            logits = adapter.model(**inputs, use_cache=False).logits
    return torch.log_softmax(logits[batch.predicts.to(logits.device)].float(), dim=-1).cpu()


def cross_entropy(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean next-token loss over the answer tokens."""
    return float(-logprobs.gather(1, targets[:, None]).mean())


def kl_from_clean(clean: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(clean || other) over the answer positions."""
    return float((clean.exp() * (clean - other)).sum(dim=-1).mean())


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """SAELens: (CE_zero - CE_sae) / (CE_zero - CE_clean); 1 for a perfect SAE, 0 for zero-ablation."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")


def kl_div_score(kl_sae: float, kl_zero: float) -> float:
    """SAELens: (KL_zero - KL_sae) / KL_zero (the clean run's KL from itself is 0)."""
    return (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan")


def zero(hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(hidden)


def identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def sae_reconstruction(sae: Any) -> Reconstruct:
    """x -> decode(encode(x)) of a sae-lens SAE, in its dtype and on its device."""

    def reconstruct(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(sae.W_enc.device, sae.W_enc.dtype)
        return sae.decode(sae.encode(x)).to(hidden.device)

    return reconstruct
