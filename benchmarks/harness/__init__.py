"""The benchmark harness: what the scripts in benchmarks/ share, and nothing any one script owns.

- `environment`: where, when and how a run happened (hardware, versions, the command to repeat it);
- `rss`: process memory (sampled RSS, the kernel's high-water marks) and the glibc allocator;
- `rows`: rows run one by one (each optionally in a fresh process), checkpointed, resumable;
- `tables`: number formats and Markdown tables, torch-free (report.py reads results without torch);
- `plots`: headless matplotlib figures written atomically;
- `outputs`: the Markdown a timing script prints, and its --markdown / --json files;
- `timing`: the speed and memory measurement of loaded models (speed.py, decode_profile.py, layer_crossover.py);
- `sizes`: parameter and byte counts of models and saved files, recounted independently of the library;
- `shapes`: what is timed: random models in public shapes, dense and SVD copies, saved folders.

The scripts put their own folder on `sys.path` and `import harness....`. This file imports nothing,
and environment, rss, rows, tables, plots, outputs and shapes import torch, matplotlib and the library
only inside the functions that need them, so report.py reads results without them.
"""
