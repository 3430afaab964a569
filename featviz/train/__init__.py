"""Training: the loop, SSL methods and semi-supervised segmentation."""
