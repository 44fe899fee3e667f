"""Data: webdataset shards (`shards` writes them), the input pipelines that read them
(`pipeline`), and the model's view of raw images and captions (`preprocess`)."""
