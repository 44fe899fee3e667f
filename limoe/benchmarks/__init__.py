"""Benchmarks, each run as `python -m limoe.benchmarks.<name>`: `layer` (one expert layer against
a dense FFN), `training` (end-to-end pairs/s against open_clip) and `data` (input pipeline
throughput on CPU). Every one prints ratios against a baseline measured in the same run."""
