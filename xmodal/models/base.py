"""What every VLM family shares: lazy loading, prompts, token positions, decoder layers.

A family adapter (gemma3.py, paligemma.py, llava.py, text_only.py) overrides only
what differs: the transformers class, where the decoder layers live, the image
token, and how a prompt is written. Weights load on first use of ``.model`` so a
run whose activations are all cached never loads them, and a bad layer index fails
after reading ``config.json`` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from PIL import Image
from torch import nn

from xmodal.errors import ConfigError, DatasetError, ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SENTINEL = "\u2063XMODALCONCEPT\u2063"  # never produced by a tokenizer's normal text


# Whole-file hashes of local weights, by path, valid while the file's size and mtime are unchanged:
# a multi-GB checkpoint is read once, not at every job start.
HASH_CACHE_ENV = "XMODAL_HASH_CACHE"
_hashes: dict[str, dict[str, Any]] = {}


def _hash_cache_path() -> Path:
    return Path(os.environ.get(HASH_CACHE_ENV, "~/.cache/xmodal/file_hashes.json")).expanduser()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; cached by path, size and mtime (in memory and on disk)."""
    path = Path(path).resolve()
    stat = path.stat()
    fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = _hash_cache_path()
    if not _hashes and cache_file.exists():
        try:
            _hashes.update(json.loads(cache_file.read_text()))
        except json.JSONDecodeError:
            log.warning("Ignoring the unreadable hash cache %s; it is rewritten", cache_file)
    known = _hashes.get(str(path))
    if known is not None and {k: known.get(k) for k in fingerprint} == fingerprint:
        return known["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    _hashes[str(path)] = {**fingerprint, "sha256": digest.hexdigest()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".file_hashes-", dir=cache_file.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(_hashes, f)
    os.replace(tmp, cache_file)  # whole or not at all; a concurrent writer's entries are recomputed
    return _hashes[str(path)]["sha256"]


def content_digest(files: Sequence[Path]) -> str:
    """One hash of several files' names and contents: local weights identified by what they hold,
    so a checkpoint retrained at the same path is a different model to resume and the caches."""
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        digest.update(f"{path.name}\x00{file_sha256(path)}\x00".encode())
    return digest.hexdigest()[:16]


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")


def local_weights_digest(folder: Path) -> str | None:
    """content_digest of a local model folder's weight and config files; None for a hub name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    return content_digest([p for pattern in WEIGHT_FILES for p in folder.glob(pattern)])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def hub_load(fn: Callable[..., Any], name_or_path: str, what: str, **kwargs: Any) -> Any:
    """Call a transformers ``from_pretrained`` and turn its failures into one clear line."""
    looks_local = name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ModelLoadError(f"local {what} directory {name_or_path!r} does not exist; set model.name_or_path to a folder holding config.json and the weights")
    try:
        return fn(str(Path(name_or_path).expanduser()) if looks_local else name_or_path, **kwargs)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load {what} {name_or_path!r} (revision {kwargs.get('revision', 'main')}) offline "
            f"or from the hub: {first_line} To fix: point model.name_or_path at a local copy "
            f"(a folder with config.json and weights), or run `hf download {name_or_path}` where there "
            "is network and set HF_HOME to that cache."
        ) from err


def hub_model_reachable(name_or_path: str, timeout_s: float = 3.0) -> bool:
    """Whether `from_pretrained` can get `name_or_path` now (a folder, a hub id in the local cache, or a
    hub that answers within `timeout_s`), asked once and fast: offline, `from_pretrained` itself spends a
    minute or more on retries before it gives up."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    if Path(name_or_path).expanduser().exists() or isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return get_session().head(f"{constants.ENDPOINT}/api/models/{name_or_path}", timeout=timeout_s).status_code < 400
    except Exception as err:  # the hub client's transport errors; their classes change with its HTTP library
        log.info("the hub does not answer for %s (%s: %s)", name_or_path, type(err).__name__, err)
        return False


class HookSite(StrEnum):
    """A point of a decoder layer that can be read and written (sae.site, and a transcoder's input)."""

    resid_post = "resid_post"  # the layer's output
    mlp_out = "mlp_out"  # what the MLP adds to the residual stream
    attn_out = "attn_out"  # the attention heads' outputs before W_O (o_proj's input, Gemma Scope 2's hook_z)
    mlp_in = "mlp_in"  # the MLP's input (what a transcoder reads)


class HookSide(StrEnum):
    output = "output"  # the module's output (its first element when it returns a tuple)
    input = "input"  # the module's first positional input


@dataclass(frozen=True)
class HookPoint:
    """A module and the side of it that holds a site's tensor: where hooks read and write."""

    module: nn.Module
    side: HookSide = HookSide.output


# Per site, the module of a decoder layer that holds it (a path below the layer, "" the layer itself)
# and its side, as candidates in order: the first the layer has is the site. Gemma 2 and 3 norm the
# MLP's output before adding it to the residual stream (post_feedforward_layernorm: what Gemma Scope's
# mlp_out SAEs read); Llama-style layers add the MLP's output as it is.
SITE_MODULES: dict[HookSite, tuple[tuple[str, HookSide], ...]] = {
    HookSite.resid_post: (("", HookSide.output),),
    HookSite.mlp_out: (("post_feedforward_layernorm", HookSide.output), ("mlp", HookSide.output)),
    HookSite.attn_out: (("self_attn.o_proj", HookSide.input),),
    HookSite.mlp_in: (("mlp", HookSide.input),),
}


# Families whose images enter the decoder through cross-attention layers, not as tokens of its sequence:
# there are no image-token positions in the residual stream for xmodal's image-token studies to read.
CROSS_ATTENTION_MODEL_TYPES = {"mllama": "Mllama (Llama 3.2 Vision)", "idefics": "Idefics 1", "flamingo": "Flamingo"}


def refuse_cross_attention(name: str, hf_config: Any) -> None:
    """One clear line for a cross-attention VLM, before any weight loads."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in CROSS_ATTENTION_MODEL_TYPES:
        raise ConfigError(
            f"model {name!r} is {CROSS_ATTENTION_MODEL_TYPES[model_type]} (model_type={model_type!r}): its images enter through "
            "cross-attention layers, so its residual stream has no image tokens for xmodal's image-token studies to read; "
            "pick a family with image tokens (Qwen2.5-VL, Gemma 3/4, LLaVA, InternVL, Idefics3)"
        )


@dataclass
class ImageLayout:
    """How one image's soft tokens (its positions in the processor's image-token mask, in order) lie.

    `grids` are the (rows, columns) of each block of content tokens in token order: one grid for a
    fixed-resolution model, the base image then the tiles for anyres (LLaVA-NeXT, LLaVA-OneVision),
    tiles then the thumbnail (InternVL, Idefics3). `content` is False at tokens that carry no patch:
    newline and separator tokens inside the image-token mask; they are left out of every pooling and
    of the stored token rows by default.
    """

    grids: list[tuple[int, int]]
    content: torch.Tensor  # bool (image tokens,)

    def __post_init__(self) -> None:
        n_content = int(self.content.sum())
        if sum(r * c for r, c in self.grids) != n_content:
            raise ModelLoadError(
                f"image layout {self.grids} holds {sum(r * c for r, c in self.grids)} tokens but the image has {n_content} content tokens; the family adapter's layout is wrong"
            )


@dataclass
class TextPrompt:
    """A tokenised text prompt and where the concept's tokens sit in it."""

    input_ids: list[int]
    concept_positions: list[int]


class ModelAdapter:
    """A loaded (or loadable) VLM with the few facts experiments need about it."""

    family: ClassVar[str] = "base"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"
    final_norm_path: ClassVar[str] = "model.language_model.norm"  # the norm before the unembedding
    supports_images: ClassVar[bool] = True
    has_decoder: ClassVar[bool] = True  # False for dual encoders (CLIP, SigLIP): no residual stream to read or steer
    # Image tokens see only the text before them (a causal decoder), so a fixed text prefix can be
    # run once and its keys and values reused (DAS). False where later text is visible to them
    # (PaliGemma's prefix-LM mask) or the family is untested: those run the whole prompt.
    reuses_text_prefix: ClassVar[bool] = False
    # Where each site sits in a decoder layer; a family whose layers name their modules otherwise overrides it.
    site_modules: ClassVar[dict[HookSite, tuple[tuple[str, HookSide], ...]]] = SITE_MODULES
    # Dynamic resolution: images of different sizes get different numbers of image tokens (Qwen's
    # image_grid_thw, anyres tiles), so batches are padded and each image is read by its own mask row.
    ragged_images: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        hf_config: Any,
        load_model: Callable[[], nn.Module],
        load_processor: Callable[[], Any],
        identity: dict[str, Any],
        device: torch.device,
        layer_presets: Sequence[int] = (),
        sae_release: str | None = None,
    ) -> None:
        self.name = name
        self.layer_presets = list(layer_presets)  # for layer=preset:i
        self.sae_release = sae_release  # the matching sae-lens release, if any
        self.hf_config = hf_config
        self._load_model = load_model
        self._load_processor = load_processor
        self.identity = identity  # everything that determines the weights; part of cache keys
        self.device = device

    # ------------------------------------------------------------ loading --
    @classmethod
    def auto_model_class(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def auto_processor_class(cls) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        name_or_path: str,
        revision: str = "main",
        dtype: str = "bfloat16",
        device: str = "auto",
        trust_remote_code: bool = False,
        layer_presets: Sequence[int] = (),
        sae_release: str | None = None,
        device_map: Any = None,
        max_memory: dict[str, str] | None = None,
        offload_folder: str | None = None,
    ) -> "ModelAdapter":
        """`device_map` ("auto", "balanced", or {module: device}) spreads the model over several
        devices with accelerate, whole decoder layers each; inputs go to `device` (the first GPU
        under "auto"), and accelerate's hooks move activations between layers."""
        from transformers import AutoConfig

        torch_dtype = resolve_dtype(dtype)
        torch_device = resolve_device(device)
        common = dict(revision=revision, trust_remote_code=trust_remote_code)
        hf_config = hub_load(AutoConfig.from_pretrained, name_or_path, "model config", **common)
        refuse_cross_attention(name, hf_config)
        placement = {}
        if device_map is not None:
            from omegaconf import DictConfig, OmegaConf

            placement = {"device_map": OmegaConf.to_container(device_map) if isinstance(device_map, DictConfig) else device_map}
            if max_memory:
                placement["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in dict(max_memory).items()}
            if offload_folder:
                placement["offload_folder"] = offload_folder

        def load_model() -> nn.Module:
            where = f"device_map={placement['device_map']}" if placement else torch_device
            log.info("Loading %s weights from %s (%s, %s)", name, name_or_path, dtype, where)
            model = hub_load(cls.auto_model_class().from_pretrained, name_or_path, "model", dtype=torch_dtype, **common, **placement)
            return model.eval() if placement else model.to(torch_device).eval()

        def load_processor() -> Any:
            return hub_load(cls.auto_processor_class().from_pretrained, name_or_path, "processor", **common)

        identity = {
            "family": cls.family,
            "name_or_path": name_or_path,
            "revision": revision,
            "commit": getattr(hf_config, "_commit_hash", None),
            "dtype": dtype,
        }
        weights = local_weights_digest(Path(name_or_path))
        if weights is not None:  # a local folder: its path says nothing about what it holds now
            identity["weights"] = weights
        return cls(name, hf_config, load_model, load_processor, identity, torch_device, layer_presets, sae_release)

    @cached_property
    def model(self) -> nn.Module:
        model = self._load_model()
        model.requires_grad_(False)
        return model

    @cached_property
    def processor(self) -> Any:
        return self._load_processor()

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # -------------------------------------------------------------- facts --
    @property
    def text_config(self) -> Any:
        return self.hf_config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.hf_config, "image_token_id", None)

    def decoder_layers(self) -> nn.ModuleList:
        return operator.attrgetter(self.decoder_layers_path)(self.model)

    def _decoder_site(self, site: str) -> HookSite:
        """`site` as a HookSite; ConfigError for a name that is none, or a site inside a decoder layer of a model without one."""
        try:
            known = HookSite(str(getattr(site, "value", site)))
        except ValueError:
            raise ConfigError(f"site {site!r} is not one of {', '.join(HookSite)}; use one of those") from None
        if known != HookSite.resid_post and not self.has_decoder:
            raise ConfigError(f"model {self.name!r} ({self.family}) has no decoder layers, so it has no site {known} to read; use sae.site=resid_post")
        return known

    def site_module(self, site: str) -> tuple[str, HookSide]:
        """(module path below a decoder layer, side) of `site` in this model's decoder layers."""
        site = self._decoder_site(site)
        candidates = self.site_modules[site]
        layer = self.decoder_layers()[0]
        for path, side in candidates:
            if not path or _has_module(layer, path):
                return path, side
        raise ConfigError(
            f"model {self.name!r} ({self.family}) has none of {[p for p, _ in candidates]} in its decoder layers, so site {site} "
            "cannot be read there; its adapter must name the module (site_modules)"
        )

    def hook_point(self, layer: int, site: str = HookSite.resid_post) -> HookPoint:
        """The module and side holding `site` of decoder layer `layer`: where hooks read and steer."""
        path, side = self.site_module(site)
        module = self.decoder_layers()[layer]
        return HookPoint(operator.attrgetter(path)(module) if path else module, side)

    def hook_name(self, layer: int, site: str = HookSite.resid_post) -> str:
        """The HF-style name of `site` at `layer` that SAEs record (cfg.json's hook_name): model.layers.9 for
        resid_post, model.layers.9.post_feedforward_layernorm.output for Gemma 3's mlp_out, ..."""
        path, side = self.site_module(site)
        return f"model.layers.{layer}" + (f".{path}.{side.value}" if path else "")

    def site_width(self, site: str = HookSite.resid_post) -> int:
        """The size of the vector at `site`: the hidden size, or heads x head_dim at attn_out (before W_O)."""
        if self._decoder_site(site) != HookSite.attn_out:
            return self.hidden_size
        config = self.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return int(config.num_attention_heads * head_dim)

    @torch.inference_mode()
    def logit_lens(self, resid: torch.Tensor) -> torch.Tensor:
        """Read resid_post of any layer as the last layer would be read: final norm, unembedding and
        (Gemma 2) the final logit soft-cap. (..., d_model) -> (..., vocab) float32 logits on the CPU."""
        unembed = self.model.get_output_embeddings()
        if unembed is None:
            raise ConfigError(
                f"model {self.name!r} has no unembedding (LM head), so its residual stream cannot be read as "
                "next-token logits; the logit lens needs a decoder model"
            )
        norm = operator.attrgetter(self.final_norm_path)(self.model)
        weight = unembed.weight
        logits = unembed(norm(resid.to(device=weight.device, dtype=weight.dtype))).float()
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.cpu()

    def image_token_grid(self, n_tokens: int) -> tuple[int, int]:
        """(rows, columns) of an image's soft tokens, row-major: 4x4 on the organism, 16x16 on Gemma 3,
        the patch grid on PaliGemma and LLaVA. A family whose layout is not a square overrides this."""
        side = int(round(n_tokens**0.5))
        if side * side != n_tokens:
            raise ConfigError(f"model {self.name!r} gives {n_tokens} image tokens, not a square grid; its adapter must say how they lie")
        return side, side

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ConfigError(
                f"layer={layer} is out of range for model {self.name!r}, which has {self.num_layers} "
                f"decoder layers (0..{self.num_layers - 1}); pick one in that range"
            )

    # ------------------------------------------------------------ prompts --
    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def user_message(self, text: str, with_image: bool) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
        if text:
            content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def render_prompt(self, text: str, with_image: bool, use_chat_template: bool) -> str:
        """The prompt string before tokenisation (image placeholders not yet expanded)."""
        if use_chat_template and self.chat_template:
            template_owner = self.processor if with_image else self.tokenizer
            return template_owner.apply_chat_template(self.user_message(text, with_image), tokenize=False, add_generation_prompt=True)
        return self.plain_prompt(text, with_image)

    def plain_prompt(self, text: str, with_image: bool) -> str:
        """Prompt without a chat template; families with a fixed format override this."""
        if with_image:
            return f"{self.processor.image_token}{text}"
        return text

    def _adds_bos(self, rendered: str) -> bool:
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and rendered.startswith(bos))

    def cut_to_tokens(self, text: str, max_tokens: int) -> str:
        """`text` up to the end of its `max_tokens`-th token under this model's tokenizer."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]

    def text_prompt(self, prompt_template: str, concept_text: str, use_chat_template: bool, max_concept_tokens: int | None = None) -> TextPrompt:
        """Tokenise the concept inside its prompt (cut to `max_concept_tokens` first) and find its token positions."""
        if max_concept_tokens is not None:
            concept_text = self.cut_to_tokens(concept_text, max_concept_tokens)
        rendered = self.render_prompt(prompt_template.replace("{concept}", _SENTINEL), False, use_chat_template)
        start = rendered.find(_SENTINEL)
        rendered = rendered.replace(_SENTINEL, concept_text)
        end = start + len(concept_text)
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"model {self.name!r} has a slow tokenizer; xmodal needs a fast one for offsets")
        encoded = tokenizer(rendered, add_special_tokens=self._adds_bos(rendered), return_offsets_mapping=True)
        positions = [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if e > s and s < end and e > start]
        if not concept_text.strip() or not positions:
            raise DatasetError(f"concept text {concept_text!r} gives no tokens inside the prompt; give the concept a non-empty text")
        return TextPrompt(list(encoded["input_ids"]), positions)

    def image_inputs(self, images: Sequence[Image.Image], prompt: str, use_chat_template: bool, **processor_kwargs: Any) -> Any:
        """Processor outputs for a batch of images, all with the same prompt (`processor_kwargs`: e.g.
        the image processor's settings that pixel synthesis asks for, `synthesis_processor_kwargs`)."""
        if not self.supports_images:
            raise ConfigError(f"model {self.name!r} ({self.family}) is text-only; it cannot read images")
        if getattr(self.processor, "image_token", None) is None or getattr(self.processor, "image_processor", None) is None:
            raise ConfigError(
                f"model {self.name!r}: its processor ({type(self.processor).__name__}) has no image token or image processor, "
                "so it cannot put images into a prompt; point model.name_or_path at a VLM checkpoint whose processor has both"
            )
        rendered = self.render_prompt(prompt, True, use_chat_template)
        # Ragged families: the same prompt expands to different lengths, so the batch is padded.
        padding = {"padding": True} if self.ragged_images else {}
        return self.processor(
            text=[rendered] * len(images),
            images=[[img.convert("RGB")] for img in images],
            return_tensors="pt",
            add_special_tokens=self._adds_bos(rendered),
            **padding,
            **processor_kwargs,
        )

    def processor_image_mask(self, inputs: Any) -> torch.Tensor:
        """The processor's own mask of image soft tokens: its ``mm_token_type_ids`` (1 at image tokens)
        where it returns them, else its image token id (xmodal.verify checks image_token_mask against it)."""
        if "mm_token_type_ids" in inputs:
            return inputs["mm_token_type_ids"] == 1
        return inputs["input_ids"] == self.processor.image_token_id

    def image_layouts(self, inputs: Any) -> list["ImageLayout"]:
        """Each image's layout (one image per row of `inputs`): by default every image token is content,
        in one grid (`image_token_grid`). Families with tiles, newlines or per-image grids override this."""
        layouts = []
        for row in self.image_token_mask(inputs["input_ids"]):
            n_tokens = int(row.sum())
            layouts.append(ImageLayout([self.image_token_grid(n_tokens)], torch.ones(n_tokens, dtype=torch.bool)))
        return layouts

    def square_tile_layouts(self, inputs: Any, per_tile: int) -> list["ImageLayout"]:
        """Layouts of families that cut an image into square tiles of `per_tile` tokens each, every token
        content (InternVL's tiles and thumbnail, Idefics3's split image and its global view)."""
        side = math.isqrt(per_tile)
        layouts = []
        for row in self.image_token_mask(inputs["input_ids"]):
            n_tokens = int(row.sum())
            if n_tokens % per_tile:
                raise ConfigError(f"model {self.name!r}: an image has {n_tokens} image tokens, not a whole number of {per_tile}-token tiles")
            layouts.append(ImageLayout([(side, side)] * (n_tokens // per_tile), torch.ones(n_tokens, dtype=torch.bool)))
        return layouts

    def image_side(self) -> int:
        """The square side, in pixels, that the processor resizes images to."""
        if self.ragged_images:
            raise ConfigError(
                f"model {self.name!r} ({self.family}) has no fixed square input: its processor resizes, tiles or "
                "patchifies each image by its own size, and its adapter names no synthesis_side, so pixel synthesis "
                "(experiment=das) cannot run on it; add one to the family's adapter"
            )
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "crop_size", None) or image_processor.size  # CLIP crops after resizing
        side = size.get("height") or size.get("shortest_edge")
        if not side or size.get("width", side) != side:
            raise ConfigError(f"model {self.name!r} expects {size} images; xmodal needs square inputs here")
        return int(side)

    # ------------------------------------------------------- synthesis --
    # Pixel synthesis (experiment=das) optimises square images of one side, read differentiably.
    synthesis_processor_kwargs: ClassVar[dict[str, Any]] = {}  # processor settings for those images
    synthesis_grey: ClassVar[float] = 0.5  # the neutral image's level in [0, 1], the baseline of its activations

    def synthesis_side(self) -> int:
        """The side of the square images that pixel synthesis optimises: one that the processor takes
        without resampling (dynamic-resolution families name theirs)."""
        return self.image_side()

    def synthesis_pixels(self, prompt: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Differentiable (n, 3, S, S) in [0, 1] -> the pixel tensor the processor gives for those images.
        Fixed-resolution families normalise; the others use the map probed off their own processor."""
        if not self.ragged_images:
            return self.normalise_pixels
        from xmodal.models.pixels import probed_pixel_map

        return probed_pixel_map(self, self.synthesis_side(), prompt, self.synthesis_processor_kwargs)

    def normalise_pixels(self, unit_images: torch.Tensor) -> torch.Tensor:
        """What the processor would feed the vision tower for (batch, 3, side, side) images in [0, 1].

        Differentiable, so that image synthesis can optimise pixels directly.
        """
        image_processor = self.processor.image_processor
        mean = torch.tensor(image_processor.image_mean, device=unit_images.device).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, device=unit_images.device).view(1, 3, 1, 1)
        return (unit_images - mean) / std

    def image_span_inputs(self, template: Any, start: int, end: int, prefix_cache: Any, n: int) -> dict[str, Any]:
        """Model inputs for positions start..end-1 of `template` (processor outputs for one image),
        repeated for `n` images, after a cached prefix (positions 0..start-1). Only where
        `reuses_text_prefix`; pixel_values are left for the caller to add."""
        raise NotImplementedError(f"{self.family} does not reuse a text prefix")

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the image soft-token positions."""
        if self.image_token_id is None:
            raise ConfigError(
                f"model {self.name!r} has no image token id in its config (image_token_id=None), so its image positions "
                "cannot be read; use a checkpoint whose config and processor define an image token"
            )
        return input_ids == self.image_token_id


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        return isinstance(operator.attrgetter(path)(root), nn.Module)
    except AttributeError:
        return False


def instantiate_model(model_cfg: Any) -> "ModelAdapter":
    """The adapter a `model` config describes (weights still unloaded).

    `base_model` names the model's base LLM for experiment=shift, `image_embedder_fallback` what
    experiment=mds may use when its image embedder cannot load; they are facts about the model,
    not arguments of its loader, so they are left out here.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    facts = ("base_model", "image_embedder_fallback")
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k not in facts}
    return instantiate(kwargs)
