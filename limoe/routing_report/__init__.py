"""`limoe routing`: routing statistics over many batches (`statistics`), pictures of them
(`pictures`), and the command that routes a checkpoint's held-out batches and writes both
(`command`)."""
