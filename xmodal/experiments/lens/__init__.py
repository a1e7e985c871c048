"""LogitLens: what do image tokens "say" at each layer, read through the unembedding and against the concept words?

config.py: its settings; experiment.py: the study.
"""
