#!/usr/bin/env bash
# Remake every checkpoint and run log that `featviz demo` uses (CPU). Measured 2026-12-01 on the project's
# shared 2-core machine: each 10-epoch SimSiam run took 115 s at load ~2.5 and 853 s at load 5-6 (other jobs);
# make_seg_checkpoints.sh adds 12-16 minutes (its own comment), so 15-35 minutes in all.
# `featviz demo --retrain` runs this. Run from the repository root.
#   checkpoints/simsiam_digits.safetensors   SimSiam with featviz's digits defaults (resnet18_w16-cifar, 32 px,
#                                            10 epochs; see docs/train.md), i.e. no flag but the seed
#   runs/simsiam_digits*/metrics.jsonl        its collapse metrics, and those of the --no-stop-grad ablation
#   checkpoints/seg_{supervised,cac}.safetensors   via make_seg_checkpoints.sh
#   checkpoints/moco_v2_tiny.pth.tar          via make_sample_checkpoints.py (seeded random weights)
#   checkpoints/vit_photos.safetensors        via make_vit_photos.py (a ViT distilled from EfficientNet-Lite1;
#                                            30 minutes at load 15-22, its own docstring)
set -euo pipefail
RUNS=${RUNS:-runs}
FEATVIZ=${FEATVIZ:-featviz}
common=(-m simsiam -d digits --seed 0 --force)
$FEATVIZ train "${common[@]}" -o "$RUNS/simsiam_digits"
$FEATVIZ train "${common[@]}" -o "$RUNS/simsiam_digits_nostopgrad" --no-stop-grad
cp "$RUNS/simsiam_digits/last.safetensors" sample_data/checkpoints/simsiam_digits.safetensors
for r in simsiam_digits simsiam_digits_nostopgrad; do
  mkdir -p "sample_data/runs/$r"
  cp "$RUNS/$r/metrics.jsonl" "$RUNS/$r/config.json" "sample_data/runs/$r/"
done
RUNS=$RUNS FEATVIZ=$FEATVIZ bash sample_data/make_seg_checkpoints.sh
${PYTHON:-python} sample_data/make_sample_checkpoints.py
${PYTHON:-python} sample_data/make_vit_photos.py
