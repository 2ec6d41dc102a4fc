"""Method-agnostic building blocks: the compressed layer, model surgery, calibration statistics,
parameter budgets, bases (decompositions) and the report. Nothing here knows a method by name."""
