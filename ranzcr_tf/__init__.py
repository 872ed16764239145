"""ranzcr-tf: TensorFlow/Keras 3 pipeline for the RANZCR CLiP catheter and line position task."""

__version__ = "0.1.0"
