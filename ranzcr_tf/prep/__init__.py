"""Preparation: decode, CLAHE + resize (one definition), the TFRecord schema, folds, the converter and its workers."""
