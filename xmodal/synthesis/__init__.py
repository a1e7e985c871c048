"""Image synthesis from text concept vectors (seed 004): concept vectors, DAS, judges, the apples/oranges check."""
