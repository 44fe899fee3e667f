"""Checkpoints on disk: exported model files, training checkpoints, and loading either.

`model_file`: one `.safetensors` with every expert and the config inside (what `limoe export`
writes and evaluation reads). `hub`: that file in a model folder of Hugging Face layout, and
`hf-hub:org/name` references to one. `training`: checkpoints of a run in progress (weights, Adam
moments, schedule), saved and resumed on any process layout; `store` is their code-free format on
disk (safetensors and JSON, checksummed, published atomically) and `engine_state` what they take
from and give to a DeepSpeed engine, `expert_entries` how they name each expert. `legacy`: every
conversion of an older format version. `loading.load_model` takes a reference of any kind.
`warm_start`: another run's weights into a fresh model (`train.init_from`). Nothing here ever
unpickles a file.
"""

from limoe.checkpoints.loading import load_model, read_config, with_eval_capacity
from limoe.checkpoints.model_file import read_model_file, save_model_file

__all__ = ["load_model", "read_config", "with_eval_capacity", "read_model_file", "save_model_file"]
