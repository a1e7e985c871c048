"""Check that xmodal reads a model right: ``python -m xmodal.verify model=<name>``.

On a text prompt and a padded batch of two images of different shapes (a wide and a tall one,
so a dynamic-resolution family gets two token counts), it checks:

- resid_post from xmodal's hooks equals transformers' ``output_hidden_states`` at every decoder
  layer (the last through the final norm, as transformers reports it);
- a pass stopped after layer L (early exit) gives the same resid_post as a full forward;
- the image-token positions xmodal reads are the processor's image-token mask, and each image's
  layout (grids plus newline or separator tokens) covers exactly its row of that mask;
- the logit lens at the last layer reproduces the model's logits;
- adding a zero steering vector at every position changes no logit.

Prints one table row per check and exits 1 when any check fails (2 on bad input, one line).
Compares only real (attention-mask) positions. Tolerances follow the model's dtype.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image

from xmodal import config as config_schema
from xmodal.activations.capture import output_replaced, resid_post_hooks, run_to_layers
from xmodal.conf_dir import CONF_DIR
from xmodal.errors import ConfigError, user_error
from xmodal.experiments import register_experiment_configs
from xmodal.models.base import ModelAdapter, instantiate_model

log = logging.getLogger(__name__)
config_schema.register_configs()
register_experiment_configs()  # the shipped config names an experiment; verify composes it and ignores it

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class Check:
    name: str
    max_diff: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance


def _diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    if mask is not None:
        a, b = a[mask.cpu().bool()], b[mask.cpu().bool()]
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def _test_images() -> list[Image.Image]:
    """A wide and a tall image with some structure (a plain colour hides layout mistakes less well)."""
    wide = Image.linear_gradient("L").resize((96, 48)).convert("RGB")
    tall = Image.radial_gradient("L").resize((40, 80)).convert("RGB")
    return [wide, tall]


def _inputs_on(adapter: ModelAdapter, inputs: Any) -> dict[str, Any]:
    return {k: v.to(adapter.device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


def verify_model(adapter: ModelAdapter, image_prompt: str = "What is in the image?", use_chat_template: bool = True) -> list[Check]:
    """Every check on `adapter`; its weights load here."""
    if not adapter.has_decoder:
        raise ConfigError(f"model {adapter.name!r} is a dual encoder: it has no decoder layers to verify; pick a decoder model")
    model = adapter.model
    tolerance = TOLERANCE.get(next(model.parameters()).dtype, 1e-2)
    n_layers = adapter.num_layers
    layers = list(range(n_layers))
    prompt = adapter.text_prompt("{concept}", "a red apple", use_chat_template)
    batches: list[tuple[str, dict[str, Any]]] = [("text", {"input_ids": torch.tensor([prompt.input_ids])})]
    if adapter.supports_images:
        batches.append(("images", dict(adapter.image_inputs(_test_images(), image_prompt, use_chat_template))))
    checks: list[Check] = []
    for what, inputs in batches:
        device_inputs = _inputs_on(adapter, inputs)
        real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        captured = run_to_layers(model, adapter.decoder_layers(), device_inputs, layers, grad=False)
        with torch.inference_mode():
            reference = model(**device_inputs, output_hidden_states=True, use_cache=False)
        hidden = reference.hidden_states
        final_norm = operator.attrgetter(adapter.final_norm_path)(model)
        per_layer = [_diff(captured[i], hidden[i + 1], real) for i in range(n_layers - 1)]
        with torch.inference_mode():
            per_layer.append(_diff(final_norm(captured[n_layers - 1]), hidden[n_layers], real))
        worst = max(range(n_layers), key=lambda i: per_layer[i])
        checks.append(Check(f"{what}: resid_post == hidden_states (all {n_layers} layers)", max(per_layer), tolerance, f"worst at layer {worst}"))

        middle = n_layers // 2
        early = run_to_layers(model, adapter.decoder_layers(), device_inputs, [middle])[middle]
        with torch.inference_mode(), resid_post_hooks(adapter.decoder_layers(), [middle], stop_after_deepest=False) as full:
            model(**device_inputs, use_cache=False)
        checks.append(Check(f"{what}: early exit == full forward (layer {middle})", _diff(early, full[middle], real), tolerance))

        lens = adapter.logit_lens(captured[n_layers - 1])
        checks.append(Check(f"{what}: logit lens at layer {n_layers - 1} == logits", _diff(lens, reference.logits, real), tolerance * 10))

        zero = torch.zeros(adapter.hidden_size)
        with torch.inference_mode(), output_replaced(adapter.decoder_layers()[middle], lambda h: h + zero.to(h.device, h.dtype)):
            steered = model(**device_inputs, use_cache=False).logits
        checks.append(Check(f"{what}: zero steering vector changes nothing", _diff(steered, reference.logits, real), 0.0))

        if what == "images":
            checks.append(_positions_check(adapter, inputs))
    return checks


def _positions_check(adapter: ModelAdapter, inputs: dict[str, Any]) -> Check:
    """xmodal's image positions == the processor's image-token mask, and each layout covers its row."""
    processor_mask = adapter.processor_image_mask(inputs)
    ours = adapter.image_token_mask(inputs["input_ids"])
    mismatched = int((processor_mask != ours).sum())
    layouts = adapter.image_layouts(inputs)
    counts = processor_mask.sum(dim=1).tolist()
    covered = [len(layout.content) for layout in layouts]
    mismatched += sum(abs(a - b) for a, b in zip(counts, covered))
    detail = "; ".join(f"{n} tokens, grids {layout.grids}, {int((~layout.content).sum())} separators" for n, layout in zip(counts, layouts))
    return Check("images: image positions == processor mask", float(mismatched), 0.0, detail)


def format_table(model: str, checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"xmodal.verify model={model}", f"{'check':<{width}}  {'max |diff|':>11}  {'tolerance':>9}  result"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.max_diff:>11.3g}  {c.tolerance:>9.2g}  {'ok' if c.ok else 'MISMATCH'}  {c.detail}".rstrip())
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks pass" + (f"; {failed} MISMATCH" if failed else ""))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        adapter = instantiate_model(cfg.model)
        checks = verify_model(adapter, cfg.positions.image_prompt or "What is in the image?", cfg.positions.use_chat_template)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        log.error("%s", cause)
        raise SystemExit(2) from None
    print(format_table(adapter.name, checks))
    if not all(c.ok for c in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
