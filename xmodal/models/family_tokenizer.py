"""Small byte-level tokenizers carrying a VLM family's special tokens, built locally with `tokenizers`.

The tiny random models of the newer families (tiny_qwen2_5_vl, tiny_llava_next, ...) need a
tokenizer whose vocabulary holds the family's own image and chat tokens (``<|image_pad|>``,
``<image>``, ``<IMG_CONTEXT>``, ...), so that the family's real processor expands the image
placeholders as it does for the real checkpoints. No package ships these tokenizers offline,
so each is built here in memory: the 256 byte tokens (no merges: every character is one or a
few tokens) followed by the family's special tokens. Built in milliseconds, identical on
every machine.
"""

from __future__ import annotations

from typing import Any, Sequence


def byte_level_tokenizer(
    special_tokens: Sequence[str],
    chat_template: str,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
) -> Any:
    """A fast tokenizer: 256 byte tokens, then `special_tokens` (ids 256, 257, ...) in that order.

    `extra_special_tokens` names some of them as attributes (``tokenizer.image_token``), as the
    hub tokenizers of the families do; processors read those attributes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [name for name in (bos_token, eos_token, pad_token) if name]
    missing = [name for name in [*names, *(extra_special_tokens or {}).values()] if name not in special_tokens]
    if missing:
        raise ValueError(f"tokens {missing} are named but not among the special tokens {list(special_tokens)}; add them there")
    vocab = {symbol: index for index, symbol in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special_tokens))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=extra_special_tokens or {},
        padding_side="right",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def images_only_processor(processor_class: type, **kwargs: Any) -> Any:
    """`processor_class` (the family's real processor) built without its video processor.

    The video processors of transformers need torchvision, which xmodal does not depend on and never
    uses: it reads images only. The tiny models build their processor this way; a real checkpoint
    loaded with AutoProcessor needs torchvision installed where its processor has a video part.
    """

    class ImagesOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None  # no video part: images only
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"{processor_class.__name__}ImagesOnly"
    return ImagesOnly(video_processor=None, **kwargs)
