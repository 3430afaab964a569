"""Where featviz's outputs go.

Atomic files and folders, manifests, embedding artifacts, progress, the bundled sample data.
"""
