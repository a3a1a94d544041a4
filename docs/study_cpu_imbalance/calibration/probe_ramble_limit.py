"""Calibration probe (not project code): the ramble build with another length limit (the regime's is 128; 64 before).

The limit is a module constant of recipe/data/tiny_assets/task.py (RAMBLE_LIMIT, RAMBLE_LENGTH, imported by name
by build.py and training.py), so this probe sets it in each of those modules before building into /tmp/ramble<L>:

    python docs/study_cpu_imbalance/calibration/probe_ramble_limit.py 192
    D=/tmp/ramble192
    python -m recipe.sweep --methods grpo --staleness 8e4 --seeds 0 1 --jobs 2 --out runs/calib_r192 -- \
      +regime=cpu_imbalance data.train_files=$D/data/train.parquet data.val_files=$D/data/test.parquet \
      actor_rollout_ref.model.path=$D/model data.max_response_length=192
    python -m recipe.sweep.imbalance runs/calib_r192

To adopt a limit, change RAMBLE_LIMIT and the regime's data.max_response_length together (a test checks they match).
"""

import sys

import recipe.data.tiny_assets.build as build
import recipe.data.tiny_assets.task as task
import recipe.data.tiny_assets.training as training
from recipe.data.tiny_assets import build_tiny_assets

limit = int(sys.argv[1])
for module in (task, build, training):
    for name in ("RAMBLE_LIMIT", "RAMBLE_LENGTH"):
        if hasattr(module, name):
            setattr(module, name, limit)
assets = build_tiny_assets(f"/tmp/ramble{limit}", response_style="ramble", verbose=True)
print(assets.root, assets.accuracy, assets.manifest["lengths"])
