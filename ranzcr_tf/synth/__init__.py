"""Synthetic chest-radiograph phantoms in the exact Kaggle layout."""
