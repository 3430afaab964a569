#!/usr/bin/env bash
# Train the two small segmentation checkpoints bundled in sample_data/checkpoints/ (CPU):
#   seg_supervised.safetensors  supervised_seg: DeepLabv3+ head on resnet18_w16-os8, the 12 labelled scenes only
#   seg_cac.safetensors         cac: the same plus CAC's directional context-aware loss on the 20 unlabelled
#                               scenes (CAC's defaults: weight_unsup 0.1, temp 0.1, pos_thresh 0.75,
#                               step_save 1, epoch_start_unsup 5; selected_num 576 = all stride-8
#                               pixels of a crop set of 4)
# Both: crop 96, base 120 (scenes are 240x180: CAC's rescale to a long side of 96-240 px never upsamples),
# 200 epochs = 600 steps of batch 4, lr 0.05, seed 0. `featviz tsne --figure cac` draws them as its two rows;
# benchmarks/cac_effect.py measures them. Run from the repository root.
# Measured on the project's shared 2-core CPU with other jobs running (load 7-10), --threads 1, two runs:
# supervised_seg 129 s and 315 s, cac 565 s and 612 s (about 12-16 minutes for both). Training is
# deterministic on CPU: both runs gave bit-identical weights.
set -euo pipefail
RUNS=${RUNS:-runs}
FEATVIZ=${FEATVIZ:-featviz}  # e.g. FEATVIZ="python -m featviz" without an installed entry point
common=(-d sample_data/seg -a resnet18_w16-os8 -b 4 --image-size 96 -e 200 --lr 0.05 --threads 1 --log-every 30
        --seed 0 --force)
$FEATVIZ train -m supervised_seg -o "$RUNS/seg_supervised" "${common[@]}"
$FEATVIZ train -m cac -o "$RUNS/seg_cac" "${common[@]}" --selected-num 576 --iou-bound 0.1 1.0
cp "$RUNS/seg_supervised/last.safetensors" sample_data/checkpoints/seg_supervised.safetensors
cp "$RUNS/seg_cac/last.safetensors" sample_data/checkpoints/seg_cac.safetensors
