"""`limoe plan`: per-GPU memory of a training config, measured on the code, and the settings that fit."""

from limoe.plan.memory import GiB, MemoryPlan, Setting, format_plan, plan_memory, refuse_if_it_cannot_fit

__all__ = ["GiB", "MemoryPlan", "Setting", "format_plan", "plan_memory", "refuse_if_it_cannot_fit"]
