"""Input pipeline: tf.data train/eval/test datasets and in-graph augmentation."""
