#!/usr/bin/env python
"""Same as the `lsanet-train` console script: python scripts/lsanet_train.py --help"""
import sys

from lsanet_jax.main import main

if __name__ == "__main__":
  sys.exit(main())
