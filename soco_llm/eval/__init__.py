"""Evaluation: perplexity on held-out text (`perplexity`) and zero-shot accuracy through lm-eval (`zeroshot`,
with offline task templates in `tasks/`)."""
