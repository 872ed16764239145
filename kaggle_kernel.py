#!/usr/bin/env python
"""Kaggle submission kernel (offline): ensemble of trained runs -> submission.csv.

    python kaggle_kernel.py                                   # on Kaggle: every default works
    python kaggle_kernel.py --data-dir demo/data --models runs/demo --out submission.csv --max-minutes 10

A thin stub over ``ranzcr_tf.serve.kernel`` (also runnable as ``python -m ranzcr_tf.serve.kernel``); see --help.
"""

import sys

from ranzcr_tf.serve.kernel import main

if __name__ == "__main__":  # the guard matters: preprocessing workers re-import this file
    sys.exit(main())
