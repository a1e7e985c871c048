"""SAEs through sae-lens: a pretrained release, a directory on disk, or none (raw residuals).

Whatever the source, the result is a FeatureSpace: ``encode`` maps the vector at its site
(``sae.site``: resid_post, mlp_out or attn_out) of the model's decoder layer L to feature
codes. An SAE trained on the TransformerLens hook ``blocks.L.hook_resid_post`` or the HF
hook ``model.layers.L(.output)`` reads exactly that tensor, so both map to decoder layer L
here; likewise ``blocks.L.hook_mlp_out`` and ``model.layers.L.post_feedforward_layernorm.output``
(Gemma) are mlp_out of layer L. A transcoder stands for layer L's MLP: it reads the MLP's
input (``mlp_in``) and its decoder writes the MLP's output (mlp_out).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from xmodal.errors import SAEError
from xmodal.models.base import content_digest, resolve_device

log = logging.getLogger(__name__)

_RESID_HOOK = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)(?:\.(?:hook_resid_post|output))?$")


def hook_layer(hook_name: str) -> int:
    """Decoder layer of a hook name at one of the sites below; SAEError for hooks elsewhere in the block."""
    found = hook_site(hook_name)
    if found is None:
        raise SAEError(
            f"the SAE reads hook {hook_name!r}, which is none of the sites xmodal reads ({', '.join(_SITE_HOOKS)}); choose an SAE trained on one of them"
        )
    return found[1]


# The sites of a decoder layer an SAE can read, from its hook name (TransformerLens or HF style).
_SITE_HOOKS = {
    "resid_post": _RESID_HOOK,
    "mlp_out": re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.(?:hook_mlp_out|mlp(?:\.output)?|post_feedforward_layernorm(?:\.output)?)$"),
    # attn_out is the heads' outputs before W_O (Gemma Scope 2's hook_z, o_proj's input), which xmodal reads and steers there
    "attn_out": re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.(?:attn\.hook_z|self_attn\.o_proj\.input)$"),
    # after W_O: another tensor, which no sae.site reads; named so that check_site refuses it in one line
    "attn_out after W_O": re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.(?:hook_attn_out|self_attn(?:\.o_proj)?(?:\.output)?)$"),
    "mlp_in": re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.(?:hook_mlp_in|mlp\.hook_in|mlp\.input|pre_feedforward_layernorm(?:\.output)?)$"),  # transcoders
}


SITES = ("resid_post", "mlp_out", "attn_out")  # the values of sae.site


def hook_site(hook_name: str) -> tuple[str, int] | None:
    """(site, decoder layer) of an SAE's hook name; None when it is none of the sites above."""
    for site, pattern in _SITE_HOOKS.items():
        match = pattern.search(hook_name)
        if match is not None:
            return site, int(match.group(1))
    return None


def check_site(name: str, sae: Any, site: str) -> None:
    """SAEError in one line when the SAE was trained at another site than `site` (sae.site)."""
    hook_name = getattr(sae.cfg.metadata, "hook_name", None)
    found = hook_site(hook_name) if hook_name else None
    if found is None:
        return  # no hook recorded: nothing to compare with
    trained = "mlp_out" if found[0] == "mlp_in" else found[0]  # a transcoder stands for its MLP (reads its input, writes its output)
    wanted = str(getattr(site, "value", site))
    if trained != wanted:
        fix = f"set sae.site={trained} or " if trained in SITES else ""
        raise SAEError(f"SAE {name!r} was trained on {found[0]} ({hook_name}), not sae.site={wanted}; {fix}choose an SAE trained at {wanted}")


def is_transcoder(sae: Any) -> bool:
    """Whether a sae-lens SAE is a transcoder (any kind: plain, skip, JumpReLU)."""
    return "transcoder" in str(sae.cfg.architecture())


class FeatureSpace:
    """Maps the vector at its site (resid_post by default) (..., d_in) to feature codes (..., d_sae).

    `site` is what the SAE stands for (sae.site): the tensor it reconstructs and steering writes.
    `reads` is where ``encode`` takes its input: the site, or for a transcoder the MLP's input.
    """

    def __init__(self, name: str, layer: int, sae: Any | None, d_in: int | None, identity: dict[str, Any], site: str = "resid_post") -> None:
        self.name = name
        self.layer = layer
        self.sae = sae
        self._d_in = d_in
        self.identity = identity
        self.site = str(getattr(site, "value", site))
        # sae.layer: the layer the SAE was trained on, as the user declares it; needed when its
        # config records no hook_name to read the layer from.
        self.trained_layer: int | None = None

    @property
    def d_in(self) -> int | None:
        return self._d_in

    @property
    def transcoder(self) -> bool:
        return self.sae is not None and is_transcoder(self.sae)

    @property
    def reads(self) -> str:
        """The site ``encode`` reads: mlp_in for a transcoder (its MLP's input), else `site`."""
        return "mlp_in" if self.transcoder else self.site

    @property
    def writes(self) -> str:
        """The site the decoder writes (steering, splicing): `site`; mlp_out for a transcoder."""
        return self.site

    @property
    def d_sae(self) -> int:
        if self.sae is not None:
            return int(self.sae.cfg.d_sae)
        if self._d_in is None:
            raise RuntimeError("raw feature space has no size until check_model() runs")
        return self._d_in

    @property
    def hook_name(self) -> str | None:
        if self.sae is None:
            return None
        return getattr(self.sae.cfg.metadata, "hook_name", None)

    def check_model(self, model_name: str, hidden_size: int, layer: int) -> None:
        """Fail clearly when this SAE cannot read the model's `reads` site at `layer`; `hidden_size` is the
        width of that site (ModelAdapter.site_width: the hidden size but at attn_out)."""
        if self.sae is None:
            self._d_in = hidden_size
            return
        if self._d_in != hidden_size:
            width = f"{hidden_size} at attn_out (heads x head_dim)" if self.reads == "attn_out" else f"hidden size {hidden_size}"
            raise SAEError(
                f"SAE {self.name!r} expects d_in={self._d_in} but model {model_name!r} has {width}; use an SAE trained on this model at sae.site={self.site}"
            )
        if self.hook_name:
            sae_layer = hook_layer(self.hook_name)
            if sae_layer != layer:
                raise SAEError(
                    f"SAE {self.name!r} was trained on layer {sae_layer} ({self.hook_name}) but layer={layer} "
                    "was requested; load the SAE for that layer (put {layer} in its id or path)"
                )
            return
        if self.trained_layer is None:
            raise SAEError(
                f"SAE {self.name!r} records no hook_name, so the layer it was trained on is unknown; set sae.layer=<that layer> (layer={layer} was requested)"
            )
        if self.trained_layer != layer:
            raise SAEError(
                f"SAE {self.name!r} was trained on layer {self.trained_layer} (sae.layer) but layer={layer} was requested; load the SAE for that layer"
            )

    @torch.inference_mode()
    def encode(self, resid: torch.Tensor, batch_size: int = 4096, on_device: bool = False) -> torch.Tensor:
        """Codes in float32: on the CPU, or with `on_device` on the SAE's device (the streaming pass pools
        them there); raw residuals pass through unchanged."""
        if self.sae is None:
            return resid.float() if on_device else resid.float().cpu()
        device, dtype = self.sae.W_enc.device, self.sae.W_enc.dtype
        chunks = [self.sae.encode(resid[i : i + batch_size].to(device=device, dtype=dtype)).float() for i in range(0, max(len(resid), 1), batch_size)]
        codes = torch.cat(chunks) if len(resid) else torch.zeros(0, self.d_sae, device=device)
        return codes if on_device else codes.cpu()

    @torch.inference_mode()
    def output(self, x: torch.Tensor) -> torch.Tensor:
        """What the SAE writes at `writes` for `x` read at `reads`, on `x`'s device and dtype: an SAE's
        reconstruction; a transcoder's prediction of its MLP's output (with the skip connection of an affine one)."""
        if self.sae is None:
            return x
        return self.sae(x.to(self.sae.W_enc.device, self.sae.W_enc.dtype)).to(x.device, x.dtype)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.sae is None:
            return codes
        return self.sae.decode(codes.to(self.sae.W_dec.device, self.sae.W_dec.dtype)).float().cpu()


def instantiate_sae(sae_cfg: Any, layer: int) -> FeatureSpace:
    """The job's FeatureSpace at decoder `layer`, from the sae config group (sae.layer, if set, is
    the layer the SAE was trained on, not the job's: it goes to FeatureSpace.trained_layer)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(sae_cfg, resolve=True) if OmegaConf.is_config(sae_cfg) else dict(sae_cfg)
    trained_layer = node.pop("layer", None)
    features = instantiate(node, layer=layer)
    features.trained_layer = trained_layer
    return features


def no_sae(name: str = "none", layer: int = 0, device: str = "auto", dtype: str = "float32", site: str = "resid_post") -> FeatureSpace:
    return FeatureSpace(name, layer, None, None, {"kind": "none"}, site)


def local_sae(name: str, path: str, layer: int, device: str = "auto", dtype: str = "float32", site: str = "resid_post") -> FeatureSpace:
    from sae_lens import SAE

    sae_dir = Path(path.format(layer=layer)).expanduser()
    if not (sae_dir / "cfg.json").exists():
        raise SAEError(
            f"no sae-lens SAE at {str(sae_dir)!r} (expected cfg.json and sae_weights.safetensors there); "
            "set sae.path to a directory written by sae-lens (SAE.save_model) or by python -m xmodal.sae_train"
        )
    sae = SAE.load_from_disk(sae_dir, device=str(resolve_device(device)), dtype=dtype)
    check_site(name, sae, site)
    log.info("Loaded SAE %s from %s (d_in=%d, d_sae=%d)", name, sae_dir, sae.cfg.d_in, sae.cfg.d_sae)
    # By content: an SAE retrained at the same path is another SAE to resume and the caches.
    identity = {"kind": "local", "path": str(sae_dir.resolve()), "weights": content_digest([p for p in sae_dir.iterdir() if p.is_file()])}
    return FeatureSpace(name, layer, sae.eval(), int(sae.cfg.d_in), identity, site)


def pretrained_sae(
    name: str,
    release: str,
    id_template: str,
    layer: int,
    width: str = "16k",
    l0: str = "medium",
    device: str = "auto",
    dtype: str = "float32",
    site: str = "resid_post",
) -> FeatureSpace:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    if not release:
        raise SAEError(f"sae={name} needs a release, but the model config names none (model.sae_release); set sae.release")
    sae_id = id_template.format(layer=layer, width=width, l0=l0)
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAEError(f"sae-lens knows no release {release!r}; see sae_lens/pretrained_saes.yaml for the names")
    known_ids = directory[release].saes_map
    if sae_id not in known_ids:
        layer_of = r"(?:layer_|blocks\.)(\d+)(?:\D|$)"  # Gemma Scope's layer_9/..., SAELens's blocks.9.hook_...
        same_layer = sorted(i for i in known_ids if [int(m) for m in re.findall(layer_of, i)][:1] == [layer])[:8]
        if same_layer:
            hint = f"ids for layer {layer}: {', '.join(same_layer)}"
        else:
            layers = sorted({int(m) for i in known_ids for m in re.findall(layer_of, i)[:1]})
            hint = f"the release has no SAE at layer {layer}; its layers are {layers}"
        raise SAEError(f"release {release!r} has no SAE {sae_id!r} (layer={layer}, width={width}, l0={l0}); {hint}")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=str(resolve_device(device)), dtype=dtype)
    except OSError as err:  # huggingface_hub's offline and connection errors are OSErrors
        raise SAEError(
            f"could not load SAE {release}/{sae_id} offline or from the hub ({type(err).__name__}); "
            "download it where there is network (`hf download` of the release's repo) and use sae=local "
            "sae.path=<its folder>, or set HF_HOME to a cache that holds it"
        ) from err
    check_site(name, sae, site)
    identity = {"kind": "pretrained", "release": release, "id": sae_id, "width": width}
    return FeatureSpace(name, layer, sae.eval(), int(sae.cfg.d_in), identity, site)
