"""Settings: TrainConfig (settings), the flags built from it (flags), --config_file (file), and the ordered
list of every feature's checks (checks)."""
