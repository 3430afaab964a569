"""Images in: image folders and datasets, masks, the augmentation pipeline, crops, thumbnails."""
