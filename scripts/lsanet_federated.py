#!/usr/bin/env python
"""Same as the `lsanet-federated` console script: python scripts/lsanet_federated.py --help"""
import sys

from lsanet_jax.federated.main import main

if __name__ == "__main__":
  sys.exit(main())
