"""Checkpoints on disk: exported model files, training checkpoints, and loading either.

`model_file`: one `.safetensors` with every expert and the config inside (what `limoe export`
writes and evaluation reads). `training`: DeepSpeed's checkpoints of a run in progress (model,
optimizer, schedule, one file per expert), resumed by `limoe train`. `loading.load_model` takes a
path of either kind. `warm_start`: another run's weights into a fresh model (`train.init_from`).
"""

from limoe.checkpoints.loading import load_model, with_eval_capacity
from limoe.checkpoints.model_file import read_model_file, save_model_file

__all__ = ["load_model", "with_eval_capacity", "read_model_file", "save_model_file"]
