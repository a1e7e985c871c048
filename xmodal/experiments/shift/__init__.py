"""RepresentationShift: how far did multimodal training move the decoder's text representations?

config.py: its settings; experiment.py: the study.
"""
