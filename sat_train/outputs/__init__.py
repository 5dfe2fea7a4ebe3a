"""What a run writes: LoRA files (diffusers, kohya) and their metadata, checkpoints, pictures, samples and
the sample prompt files."""
