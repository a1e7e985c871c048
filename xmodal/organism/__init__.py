"""The model organism: a small Gemma 3 VLM whose world xmodal controls.

Its language model is the real google/gemma-3-270m (frozen); its SigLIP vision tower
and projector are small and trained by xmodal on captioned images from `world`.
"""
