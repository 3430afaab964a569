"""Dense views of one model on images: attention, PCA of patch features, contrastive crops, the CAM family."""
