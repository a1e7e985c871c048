"""Dual encoders (CLIP, SigLIP): a text tower and an image tower that meet in one embedding space.

Seed 002 studies CLIP itself. There is no decoder and no residual stream here: what the
studies read at `layer=0` is the shared embedding, one vector per text and one per image, as
a single "token". `layer=l` (1 up to the shallower tower's depth) reads both towers' hidden
states after l blocks instead, pooled where each tower pools (text: the token its pooler
reads; image: the mean over patches); text and image share a space there only when the two
towers have the same width. The studies that compare codes across modalities (mds, probe,
overlap) run unchanged; those that need a decoder (steering, shift, DAS, the logit lens, ...)
refuse a dual encoder before it loads.

Family differences sit in the two small subclasses: the `transformers` model class, and
how texts are padded (SigLIP was trained on max-length padding and expects it).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter

log = logging.getLogger(__name__)


class DualEncoderAdapter(ModelAdapter):
    """A contrastive image-text model through `transformers` (`get_text_features`, `get_image_features`)."""

    family: ClassVar[str] = "dual_encoder"
    has_decoder: ClassVar[bool] = False
    text_padding: ClassVar[str] = "longest"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import AutoModel

        return AutoModel

    @property
    def num_layers(self) -> int:
        """Layer 0, the shared embedding, then the towers' blocks 1 .. the shallower tower's depth."""
        return 1 + min(self.hf_config.text_config.num_hidden_layers, self.hf_config.vision_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """The width of the shared embedding (layer 0)."""
        return int(self.hf_config.projection_dim if hasattr(self.hf_config, "projection_dim") else self.hf_config.text_config.hidden_size)

    def width(self, layer: int, modality: str) -> int:
        if layer == 0:
            return self.hidden_size
        return int((self.hf_config.text_config if modality == "text" else self.hf_config.vision_config).hidden_size)

    @property
    def image_token_id(self) -> int | None:
        return None

    def decoder_layers(self) -> nn.ModuleList:
        raise ConfigError(f"model {self.name!r} is a dual encoder (CLIP/SigLIP): it has no decoder layers")

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ConfigError(
                f"layer={layer} is out of range for model {self.name!r}, a dual encoder: layer=0 is the shared "
                f"embedding, layers 1..{self.num_layers - 1} its towers' hidden states"
            )

    def text_pool_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per text, the position its tower's pooler reads: CLIP's end-of-text token, the last real one."""
        return attention_mask.sum(dim=1) - 1

    # ------------------------------------------------------------ embeddings --
    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], layer: int = 0) -> torch.Tensor:
        """(n, width) per text: the embedding the contrastive head sees (layer 0, not normalised), or the
        text tower's hidden state after `layer` blocks at the position its pooler reads."""
        inputs = self.processor.tokenizer(list(texts), padding=self.text_padding, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**inputs, output_hidden_states=layer > 0)
        if layer == 0:
            return _pooled(out).float().cpu()
        hidden = out.hidden_states[layer]
        return hidden[torch.arange(len(hidden)), self.text_pool_index(inputs["attention_mask"])].float().cpu()

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], layer: int = 0) -> torch.Tensor:
        """(n, width) per image: the embedding (layer 0), or the vision tower's hidden state after `layer` blocks, mean over tokens."""
        pixels = self.processor.image_processor([img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype), output_hidden_states=layer > 0)
        if layer == 0:
            return _pooled(out).float().cpu()
        return out.hidden_states[layer].mean(dim=1).float().cpu()


def _pooled(output: Any) -> torch.Tensor:
    """`get_*_features` returns the projected embedding as a tensor (transformers 4) or as pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPAdapter(DualEncoderAdapter):
    family: ClassVar[str] = "clip"


class SiglipAdapter(DualEncoderAdapter):
    family: ClassVar[str] = "siglip"
    text_padding: ClassVar[str] = "max_length"  # SigLIP's text tower was trained on padding to 64 tokens

    def text_pool_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.full((len(attention_mask),), attention_mask.shape[1] - 1)  # SigLIP pools the last position, padding or not


# ------------------------------------------------------------------ tiny CLIP --
def byte_level_clip_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt of a CLIP tokenizer with no merges: every byte is a token (offline, tiny)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_clip(
    name: str = "clip_tiny",
    cache_dir: str = "~/.cache/xmodal/models",
    hidden_size: int = 32,
    projection_dim: int = 32,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    init_seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    layer_presets: Sequence[int] = (0,),
    sae_release: str | None = None,
) -> CLIPAdapter:
    """A random-weight CLIPModel with a byte-level CLIP tokenizer, written to disk once and loaded from
    there like any local checkpoint (so the tests go through the real loading path). Mechanics only."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # no torchvision needed

    folder = Path(cache_dir).expanduser() / f"{name}-seed{init_seed}-{hidden_size}x{num_layers}-{image_size}px"
    if not (folder / "model.safetensors").exists():
        tmp = folder.with_name(folder.name + ".tmp")  # built aside, renamed when whole
        shutil.rmtree(tmp, ignore_errors=True)
        byte_level_clip_tokenizer_files(tmp / "byte_vocab")
        tokenizer = CLIPTokenizer(str(tmp / "byte_vocab" / "vocab.json"), str(tmp / "byte_vocab" / "merges.txt"))
        common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=2)
        config = CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **common,
            ),
            vision_config=dict(image_size=image_size, patch_size=patch_size, **common),
            projection_dim=projection_dim,
        )
        torch.manual_seed(init_seed)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
        CLIPModel(config).save_pretrained(tmp)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        log.info("Built the tiny CLIP (random weights, seed %d) in %s", init_seed, folder)
    adapter = CLIPAdapter.from_pretrained(name, str(folder), dtype=dtype, device=device, layer_presets=layer_presets, sae_release=sae_release)
    adapter.identity |= {"from": "tiny random CLIP", "init_seed": init_seed}
    return adapter
