"""The shipped model and training configs (YAML, read as data); installed as `limoe.configs`."""
