"""Building blocks the model files are made of; they read per-step metadata from `layers.context`."""
