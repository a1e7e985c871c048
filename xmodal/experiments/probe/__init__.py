"""LinearProbeTransfer: does a concept probe trained on one modality read the other?

config.py: its settings; experiment.py: the study.
"""
