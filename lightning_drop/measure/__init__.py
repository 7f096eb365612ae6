"""Measurements of a dropped model: lm-eval quality and perplexity, significance, generation speed
and its ideal, the run-time sublayer check, quantization and its quality table, plots.

Nothing is imported here: importing a module of this package loads only what that module needs."""
