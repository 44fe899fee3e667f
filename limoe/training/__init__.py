"""Training: the loop inside DeepSpeed's engine (`trainer`), what a run optimises and how each of
its steps is produced (`objectives`), one exact step at any micro-batch size (`step`), the
engine's config (`deepspeed_config`), batches copied to the GPU ahead of their step
(`device_batches`), the losses (`losses`), what it reports while it runs (`progress`) and when it
ends (`final_report`). Whether a run fits in GPU memory: `limoe.plan`, which measures this package's
step and which `limoe train` (`limoe.train_command`) consults before training."""
