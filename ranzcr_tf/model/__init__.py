"""Models (Keras only, no TensorFlow import): backbones, layers, heads, losses, metrics, precision."""
