"""Serving: loading runs, the prediction path, TTA/ensembling, time budget, the kernel, packaging, submission."""
