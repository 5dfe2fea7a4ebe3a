"""Training data: records (folders, datasets), the data check, the dataset and its transforms, aspect-ratio
buckets, the latent cache; main_process: work the main process does for all (its result or failure sent to
every process)."""
