"""Maps of embeddings: t-SNE/UMAP/PCA projection, plots, interactive pages, TensorBoard's projector, CAC's Figure 3."""
