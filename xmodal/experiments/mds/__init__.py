"""MDSClassifier: which SAE features belong to images, which to text, and which to both?

config.py: its settings; experiment.py: the study.
"""
