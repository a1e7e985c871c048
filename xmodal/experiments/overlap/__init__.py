"""CrossModalOverlap: does a concept's text light up the same SAE features as its image?

config.py: its settings; experiment.py: the study.
"""
