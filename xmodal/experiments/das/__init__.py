"""DASynthesis: can an image be synthesised, at layer L, from a concept's text alone?

config.py: its settings; experiment.py: the study. Its method's parts, which import no
other study: concept_vectors.py (seed 004's text vectors), synthesis.py (Direct Ascent
Synthesis), judges.py (VLM and programmatic judges), alignment.py (the apples/oranges
check) and benchmark.py (seconds per step: python -m xmodal.experiments.das.benchmark).
"""
