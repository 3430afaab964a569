"""Semantic-segmentation training: supervised (``supervised_seg``) and CAC (``cac``).

The model, its description and checkpoints live in ``featviz.models.segmenter``; here are CAC's loss
and memory bank (``cac``), the VOC-layout data (``dataset``) and the training task (``task``).


CAC (Lai et al., "Semi-supervised Semantic Segmentation with Directional Context-aware
Consistency", CVPR 2021) trains, on two overlapping crops of an unlabelled image, a projector
(Conv1x1 -> ReLU -> Conv1x1, l2-normalised) on the stride-8 decoder features with the directional
contrastive loss: each overlap pixel is pulled toward its counterpart in the other crop only where
that counterpart is the more confident one (and above ``pos_thresh``); negatives are
``selected_num`` random pixels per crop set, gathered from every rank without gradient and kept
for ``step_save`` more steps, whose pseudo label differs from the anchor's. ``SegTask`` (method
``cac``) follows ``models/model.py`` ``CAC.forward`` line by line; docs/train.md lists CAC's
defaults beside featviz's.
"""
