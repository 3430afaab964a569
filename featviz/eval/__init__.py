"""Embeddings and how good they are: embed, DINO's k-NN, the linear probe, train/val splits."""
