import os

# Quiet TensorFlow's start-up chatter and keep tests on the CPU with the TensorFlow backend unless a test says otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
