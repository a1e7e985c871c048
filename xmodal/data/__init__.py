"""Concept datasets: matched text/image pairs from folders, the built-in list, or drawn shapes."""
