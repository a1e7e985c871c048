"""RepresentationAlignment: how alike are two representations of the same concepts, without an SAE?

config.py: its settings; experiment.py: the study.
"""
