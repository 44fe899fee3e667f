"""`limoe routing`: routing statistics over many batches (`statistics`), what the report records
per checkpoint (`records`), pictures of it (`pictures`), and the command that routes a
checkpoint's held-out batches and writes both (`command`)."""
