"""Adapting a trained model to a labelled task from a few examples, with its tower frozen.

`run_tune` is `limoe tune`: K-shot support sets (`few_shot`), Uni-Perceiver's prompt tuning
(`prompt_tuning`, on the parts in limoe.model.prompts) and the linear-probe baseline (`probe`).
"""

from limoe.tuning.command import run_tune
from limoe.tuning.prompt_tuning import TuneRecipe, tune_prompts

__all__ = ["run_tune", "TuneRecipe", "tune_prompts"]
