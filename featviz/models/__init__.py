"""What a model is: its description, architectures, the feature core, checkpoint layouts and the loader."""
