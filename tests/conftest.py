import os

# Quiet TensorFlow's start-up chatter and keep tests on the CPU with the TensorFlow backend unless a test says otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# A bare train_tpu.py trains the mission preset (configs/b7_768_tpu.yaml); tests that run it without --config
# mean the library defaults plus their --set overrides. Tests of the bare command itself unset this.
os.environ.setdefault("RANZCR_DEFAULT_PRESET", "none")
