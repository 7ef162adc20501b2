"""Evaluation: held-out window statistics, the cloze task, the lm-eval adapter."""
