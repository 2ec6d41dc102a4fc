"""Method-agnostic building blocks, nothing here knows a method by name: the compressed layer (`layer`),
model surgery (`adapter`: decoder blocks, targets, module swap), calibration statistics (`stats`), parameter
budgets and the global cut (`budget`), the decompositions (`decompose`), the dense teacher and the KL to it
(`teacher`, `head`), the one training loop with its checkpoints (`trainer`), what healing trains of each
factor (`factor_params`), phase records (`phases`) and the report (`report`)."""
