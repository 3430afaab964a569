#!/usr/bin/env bash
# Train the two small segmentation checkpoints bundled in sample_data/checkpoints/ (CPU, a few minutes):
#   seg_supervised.safetensors  supervised_seg: DeepLabv3+ head on resnet18_w16-os8, labelled crops only
#   seg_cac.safetensors         cac: the same plus CAC's directional pixel contrast on unlabelled pairs
# `featviz tsne --figure cac` draws them as its two rows. Run from the repository root.
set -euo pipefail
RUNS=${RUNS:-runs}
FEATVIZ=${FEATVIZ:-featviz}  # e.g. FEATVIZ="python -m featviz" without an installed entry point
common=(-d sample_data/seg -a resnet18_w16-os8 -b 4 --image-size 64 -e 40 --lr 0.05 --threads 1 --log-every 3 --seed 0 --force)
$FEATVIZ train -m supervised_seg -o "$RUNS/seg_supervised" "${common[@]}"
$FEATVIZ train -m cac -o "$RUNS/seg_cac" "${common[@]}" --selected-num 256 --iou-bound 0.1 1.0
cp "$RUNS/seg_supervised/last.safetensors" sample_data/checkpoints/seg_supervised.safetensors
cp "$RUNS/seg_cac/last.safetensors" sample_data/checkpoints/seg_cac.safetensors
