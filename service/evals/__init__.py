"""Evaluation sets and runs: a model version run over {input, reference} items, scored."""
