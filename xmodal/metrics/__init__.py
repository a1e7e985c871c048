"""Statistics: overlap metrics and their permutation nulls."""
