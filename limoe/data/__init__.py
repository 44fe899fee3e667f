"""Data: webdataset shards (`shards` writes them), the input pipelines that read them
(`pipeline`, with one reader per modality in `readers`), and the model's view of raw images and
captions (`preprocess`)."""
