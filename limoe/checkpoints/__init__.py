"""Checkpoints on disk: exported model files, training checkpoints, and loading either.

`model_file`: one `.safetensors` with every expert and the config inside (what `limoe export`
writes and evaluation reads). `hub`: that file in a model folder of Hugging Face layout, and
`hf-hub:org/name` references to one. `training`: DeepSpeed's checkpoints of a run in progress
(model, optimizer, schedule, one file per expert), resumed by `limoe train`.
`loading.load_model` takes a reference of any kind.
"""

from limoe.checkpoints.loading import load_model, read_config, with_eval_capacity
from limoe.checkpoints.model_file import read_model_file, save_model_file

__all__ = ["load_model", "read_config", "with_eval_capacity", "read_model_file", "save_model_file"]
