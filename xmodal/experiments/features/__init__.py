"""FeatureCards: what is an SAE feature about, in text and on the image?

config.py: its settings; experiment.py: the study.
"""
