"""What every learned method shares, so a new one is only its own package under `methods/`: its config's
base (`config.LearnedConfig`: run folder, deviation d, cached teacher, re-cut), the spectral layer it trains
(`spectral`), the size model that meets a budget (`size`), the global cut (`cut`), the re-cut of a finished
run at another ratio (`recut`, `soco export`) and the run folder (`run_folder`, `run_state`). The training
loop they all run is `core/trainer.py`."""
