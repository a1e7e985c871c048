"""Gemma Scope 2 in full, through sae-lens's directory of pretrained SAEs (no download to resolve).

For each Gemma 3 size, pt and it, Google released SAEs at four layers (``-res``, ``-mlp``,
``-att``: residual stream, MLP output, attention heads' output) and at every layer (``-all``), and
transcoders (``-transcoders``, ``-transcoders-all``), in widths 16k to 1m and three sparsities
(l0 small, medium, big; the ``-all`` releases have small and big). `gemma_scope_2_id` turns the
choices of ``sae=gemma_scope_2`` into the release and id sae-lens knows, or fails naming the
nearest ids that exist; `gemma_scope_2_sae` loads it (``pretrained_sae``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from xmodal.errors import SAEError
from xmodal.saes.loading import FeatureSpace, pretrained_sae

RELEASE_KIND = {"resid_post": "res", "mlp_out": "mlp", "attn_out": "att"}
_BASE = re.compile(r"^(gemma-scope-2-[0-9.]+[mb]-(?:pt|it))(?:-[a-z-]+)?$")
_ID = re.compile(r"layer_(\d+)_width_(\w+?)_l0_(small|medium|big)(_affine)?$")


@lru_cache(maxsize=1)
def directory() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def release_name(model_release: str, site: str = "resid_post", all_layers: bool = False, transcoder: bool = False, tuning: str = "model") -> str:
    """The sae-lens release for a model's Gemma Scope 2 release (e.g. gemma-scope-2-4b-it-res) and the choices."""
    match = _BASE.match(model_release or "")
    if match is None:
        raise SAEError(
            f"sae=gemma_scope_2 needs a Gemma 3 model's Gemma Scope 2 release (like gemma-scope-2-4b-it-res), got {model_release!r}; "
            "choose a Gemma 3 model (model=gemma3_4b) or set sae.release"
        )
    base = match.group(1)
    if tuning in ("pt", "it"):
        base = f"{base[:-2]}{tuning}"
    if transcoder:
        if site != "mlp_out":
            raise SAEError(f"sae.transcoder=true with sae.site={site}: a transcoder stands for an MLP; set sae.site=mlp_out")
        kind = "transcoders"
    else:
        kind = RELEASE_KIND[site]
    return f"{base}-{kind}{'-all' if all_layers else ''}"


def sae_id(release: str, layer: int, width: str, l0: str, affine: bool = False) -> str:
    """The id in `release`: layer_<L>_width_<w>_l0_<l0>[_affine], under transcoder/ in the four-layer transcoder release."""
    prefix = "transcoder/" if release.endswith("-transcoders") else ""
    return f"{prefix}layer_{layer}_width_{width}_l0_{l0}{'_affine' if affine else ''}"


def nearest_ids(known: list[str], layer: int, width: str, l0: str, affine: bool, n: int = 6) -> list[str]:
    """The ids closest to the one asked for: same layer first, then the nearest layer, then width, l0 and affine agreeing."""

    def distance(candidate: str) -> tuple:
        match = _ID.search(candidate)
        if match is None:
            return (1, 0, 0, 0, 0, candidate)
        c_layer, c_width, c_l0, c_affine = int(match.group(1)), match.group(2), match.group(3), bool(match.group(4))
        return (0, abs(c_layer - layer), c_width != width, c_l0 != l0, c_affine != affine, candidate)

    return sorted(known, key=distance)[:n]


def gemma_scope_2_id(
    model_release: str,
    layer: int,
    site: str = "resid_post",
    width: str = "16k",
    l0: str = "medium",
    all_layers: bool = False,
    transcoder: bool = False,
    affine: bool = False,
    tuning: str = "model",
) -> tuple[str, str]:
    """(release, id) that exist in sae-lens's directory; SAEError naming the nearest ids otherwise."""
    site, l0, tuning = (str(getattr(v, "value", v)) for v in (site, l0, tuning))
    release = release_name(model_release, site, all_layers, transcoder, tuning)
    if affine and not transcoder:
        raise SAEError("sae.affine=true applies to transcoders only; set sae.transcoder=true or sae.affine=false")
    releases = directory()
    if release not in releases:
        siblings = sorted(r for r in releases if r.startswith(release.rsplit("-", 2 if all_layers else 1)[0]))
        raise SAEError(f"sae-lens has no Gemma Scope 2 release {release!r}; the releases for this model are {siblings}")
    wanted = sae_id(release, layer, width, l0, affine)
    known = list(releases[release].saes_map)
    if wanted not in known:
        nearest = ", ".join(nearest_ids(known, layer, width, l0, affine))
        raise SAEError(f"release {release!r} has no SAE {wanted!r} (layer={layer}, width={width}, l0={l0}); the nearest that exist: {nearest}")
    return release, wanted


def gemma_scope_2_sae(
    name: str,
    release: str,
    layer: int,
    site: str = "resid_post",
    width: str = "16k",
    l0: str = "medium",
    all_layers: bool = False,
    transcoder: bool = False,
    affine: bool = False,
    tuning: str = "model",
    device: str = "auto",
    dtype: str = "float32",
) -> FeatureSpace:
    """The Gemma Scope 2 SAE (or transcoder) the choices name, loaded through sae-lens."""
    resolved, wanted = gemma_scope_2_id(release, layer, site, width, l0, all_layers, transcoder, affine, tuning)
    # the id holds no braces, so pretrained_sae's template is the id itself
    return pretrained_sae(name, resolved, wanted, layer, width, l0, device, dtype, site=str(getattr(site, "value", site)))
