"""The model: its parts (components), what differs between families (family), loading (load, single_file),
the LoRA adapters (lora), the VAE's helpers (vae) and caption word tokens (words)."""
