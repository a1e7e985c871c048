"""Model adapters: one small class per VLM family, shared logic in base.py."""

from xmodal.models.base import ModelAdapter, TextPrompt
from xmodal.models.gemma3 import Gemma3Adapter
from xmodal.models.llava import LlavaAdapter
from xmodal.models.paligemma import PaliGemmaAdapter
from xmodal.models.text_only import TextOnlyAdapter

__all__ = ["ModelAdapter", "TextPrompt", "Gemma3Adapter", "LlavaAdapter", "PaliGemmaAdapter", "TextOnlyAdapter"]
