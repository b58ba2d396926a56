#!/usr/bin/env bash
# A contributor's commands on a GPU: train a LoRA expert and its gate, and recycle a peft (IA)^3
# adapter made on the spot (gate only), both on the tiny base in bf16 on the device, then
# inspect both bundles. Copy the bundles back and `gaggle-contributor inspect` them on a CPU
# machine: the coordinator's fp32 CPU view of the base must accept what a bf16 GPU produced.
#
#   bash bench/gpu_contributor.sh OUTDIR          # DEVICE=cpu to try it without a GPU
set -euo pipefail
out=${1:?usage: bench/gpu_contributor.sh OUTDIR}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

"$python" - "$scratch" <<'PY'
import json, random, sys
from pathlib import Path

rng = random.Random(0)
with open(Path(sys.argv[1]) / "data.jsonl", "w") as records:
    for _ in range(64):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        records.write(json.dumps({"input": f"{a} plus {b} is", "target": f" {a + b}"}) + "\n")
PY

"$python" - "$scratch" <<'PY'
import sys
import torch
from peft import IA3Config, get_peft_model
from routing.base import load_base

base = load_base("tiny-llama")
config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                   feedforward_modules=["down_proj"], init_ia3_weights=False)
torch.manual_seed(0)
get_peft_model(base.model, config).save_pretrained(f"{sys.argv[1]}/peft-ia3")
PY

contributor=("$python" -m contributor.cli)
time "${contributor[@]}" train --base tiny-llama --data "$scratch/data.jsonl" \
    --out "$out/trained" --steps 40 --gate-steps 20 --device "$device" --dtype bfloat16
time "${contributor[@]}" gate --adapter "$scratch/peft-ia3" --base tiny-llama \
    --data "$scratch/data.jsonl" --out "$out/recycled" --gate-steps 20 --device "$device" \
    --dtype bfloat16
"${contributor[@]}" inspect "$out/trained" --base tiny-llama
"${contributor[@]}" inspect "$out/recycled" --base tiny-llama
