#!/usr/bin/env bash
# Remake every checkpoint and run log that `featviz demo` uses (CPU; about 7 minutes on 2 cores).
# `featviz demo --retrain` runs this. Run from the repository root.
#   checkpoints/simsiam_digits.safetensors   SimSiam, resnet18_w16-cifar, digits at 16 px, 30 epochs
#   runs/simsiam_digits*/metrics.jsonl        its collapse metrics, and those of the --no-stop-grad ablation
#   checkpoints/seg_{supervised,cac}.safetensors   via make_seg_checkpoints.sh
#   checkpoints/moco_v2_tiny.pth.tar          via make_sample_checkpoints.py (seeded random weights)
set -euo pipefail
RUNS=${RUNS:-runs}
FEATVIZ=${FEATVIZ:-featviz}
common=(-m simsiam -d digits -a resnet18_w16-cifar --image-size 16 -b 64 --lr 0.1 -e 30 --min-scale 0.8 --no-hflip
        --log-every 5 --seed 0 --force)
$FEATVIZ train "${common[@]}" -o "$RUNS/simsiam_digits"
$FEATVIZ train "${common[@]}" -o "$RUNS/simsiam_digits_nostopgrad" --no-stop-grad
cp "$RUNS/simsiam_digits/last.safetensors" sample_data/checkpoints/simsiam_digits.safetensors
for r in simsiam_digits simsiam_digits_nostopgrad; do
  mkdir -p "sample_data/runs/$r"
  cp "$RUNS/$r/metrics.jsonl" "$RUNS/$r/config.json" "sample_data/runs/$r/"
done
RUNS=$RUNS FEATVIZ=$FEATVIZ bash sample_data/make_seg_checkpoints.sh
${PYTHON:-python} sample_data/make_sample_checkpoints.py
