"""SteeringEval: does a feature found in text change what the model says about an image?

config.py: its settings; experiment.py: the study.
"""
