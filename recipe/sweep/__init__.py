"""Sweeps: a grid of methods x staleness levels x seeds (x extra override sets), one folder per run.

    python -m recipe.sweep --methods bapo grpo clip_higher --staleness 1 4 8 --seeds 0 1 2 3 4 --out runs/study
    python -m recipe.report runs/study --out runs/study/report

This package owns: the grid (`grid.py`: methods, staleness and seed overrides, run names), the run folder
(`runs.py`: run.json, per-attempt metrics and their merge), launching one attempt (`launch.py`) and the
command line (`__main__.py`). On a laptop the runs go through `python -m recipe.bapo.main_bapo` with a
bounded number at a time; with `--cluster` it prepares the same folders and prints one command per run
(`python -m recipe.sweep.launch RUN_DIR`, to wrap in a cluster job; the folder must be on shared storage).

Skipping and resuming: a folder whose run.json says `finished` is skipped; any other prepared folder is
resumed: the next attempt starts with trainer.resume_mode=auto from the run's checkpoints
(trainer.default_local_dir=<run>/checkpoints, saved every --save-freq steps), so an interrupted run
continues where its last checkpoint left it. A folder made with other arguments is an error.

verl internals this relies on (verl 0.9.1):
* the file logger (`verl/utils/tracking.py::FileLogger`) writes `{"step", "data"}` JSON lines to
  $VERL_FILE_LOGGER_PATH and opens it with "wb": each attempt gets its own file, merged by step;
* `latest_checkpointed_iteration.txt` in trainer.default_local_dir names the step a resume starts from;
* the seed keys listed in `grid.py` and staleness = ppo_epochs * train_batch_size / ppo_mini_batch_size
  (`verl/workers/engine_workers.py::TrainingWorker.train_mini_batch`).
"""
