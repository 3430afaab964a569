"""Where featviz's outputs go: atomic files and folders, manifests, embedding artifacts, progress,
the bundled sample data."""
