"""Layer specifications, so one sweep can cover models of different depths.

``layer`` takes three forms:
- ``9``: decoder layer 9 (0-based);
- ``rel:0.25``: a fraction of depth, 0.25 * (num_layers - 1) rounded half up, so rel:0
  is the first layer and rel:1 the last;
- ``preset:2``: the third entry of the model config's ``layer_presets`` (e.g. the
  layers where Gemma Scope 2 has SAEs for that model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from xmodal.errors import ConfigError

FORMS = "an int (9), a fraction of depth (rel:0.25) or an index into model.layer_presets (preset:0)"


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "abs" | "rel" | "preset"
    value: float

    def __str__(self) -> str:
        return str(int(self.value)) if self.kind == "abs" else f"{self.kind}:{self.value:g}"


def parse_layer(spec: Any) -> LayerSpec:
    """Check a layer spec's syntax (no model needed). Raises ConfigError."""
    if isinstance(spec, bool):
        raise ConfigError(f"layer={spec!r} is not a layer; give {FORMS}")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"layer={spec} is negative; layers count from 0")
        return LayerSpec("abs", spec)
    text = str(spec).strip()
    kind, _, value = text.partition(":")
    try:
        if text.isdigit():
            return LayerSpec("abs", int(text))
        if kind == "rel":
            fraction = float(value)
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"layer={text} is outside rel:0..rel:1; a fraction of depth lies in [0, 1]")
            return LayerSpec("rel", fraction)
        if kind == "preset":
            return LayerSpec("preset", int(value))
    except ValueError:
        pass
    raise ConfigError(f"layer={text!r} is not a layer; give {FORMS}")


def resolve_layer(spec: LayerSpec, num_layers: int, presets: Sequence[int], model_name: str) -> int:
    """The absolute decoder layer for a model of `num_layers` layers."""
    if spec.kind == "abs":
        return int(spec.value)
    if spec.kind == "rel":
        return int(math.floor(spec.value * (num_layers - 1) + 0.5))
    index = int(spec.value)
    if not presets:
        raise ConfigError(f"layer=preset:{index} but model {model_name!r} has no layer_presets; set model.layer_presets")
    if not 0 <= index < len(presets):
        raise ConfigError(f"layer=preset:{index} is out of range: model {model_name!r} has {len(presets)} presets {list(presets)}")
    return int(presets[index])


def layer_given(overrides: Sequence[str]) -> bool:
    """Whether the command line (Hydra's task overrides) sets `layer`, rather than the default."""
    return any(o.partition("=")[0].lstrip("+~") == "layer" for o in overrides)


def relative_depth(layer: int, num_layers: int) -> float:
    return layer / (num_layers - 1) if num_layers > 1 else 0.0
