"""Training data: records (folders, datasets), the data check, the dataset and its transforms, aspect-ratio
buckets, the latent cache."""
