#!/usr/bin/env bash
# SAT through `python -m sat_train.kohya` in a real kohya-ss/sd-scripts checkout (CPU is fine), against their
# plain run: forwards per step, s/it, and their own script's LoRA for the bit-for-bit check of --sat_guide none.
#   SD_SCRIPTS=/path/to/sd-scripts OUT=/tmp/kohya-run bash benchmarks/kohya/run.sh
# Run it in their environment (their requirements.txt, their -e ., and `pip install -e /path/to/sat`), after
# `python benchmarks/kohya/make_sd15.py $OUT`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$SD_SCRIPTS"
common=(--pretrained_model_name_or_path "$OUT/sd15" --train_data_dir "$OUT/data" --output_name lora
        --network_module networks.lora --network_dim 4 --resolution 256 --max_train_steps 4 --train_batch_size 1
        --sdpa --max_data_loader_n_workers 0 --caption_extension .txt --tokenizer_cache_dir "$OUT/tokcache"
        --seed 0 --save_model_as safetensors --learning_rate 1e-3)
for guide in none sac; do
    HF_HUB_OFFLINE=1 python "$here/count_forwards.py" train_network.py "${common[@]}" --output_dir "$OUT/$guide" \
        --sat_guide "$guide" > "$OUT/$guide.log" 2>&1
    echo "$guide: $(grep UNET_FORWARDS "$OUT/$guide.log") $(grep -o '4/4 \[[^]]*\]' "$OUT/$guide.log" | tail -1)"
done
HF_HUB_OFFLINE=1 python train_network.py "${common[@]}" --output_dir "$OUT/theirs" > "$OUT/theirs.log" 2>&1
python - "$OUT" <<'PY'
import sys
import torch
from safetensors import safe_open
from safetensors.torch import load_file
out = sys.argv[1]
files = {name: load_file(f"{out}/{name}/lora.safetensors") for name in ("theirs", "none", "sac")}
print("none == theirs, bit for bit:", all(torch.equal(files["theirs"][k], files["none"][k]) for k in files["theirs"]))
ups = [k for k in files["sac"] if "lora_up" in k]
print(f"sac: {sum(not torch.equal(files['sac'][k], files['none'][k]) for k in ups)} of {len(ups)} up matrices differ from none")
with safe_open(f"{out}/sac/lora.safetensors", "pt") as f:
    print("sac metadata:", {k: v for k, v in f.metadata().items() if k.startswith("sat_")})
PY
