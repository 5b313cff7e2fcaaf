"""Runs ``infl-train`` from a checkout without installing the console script."""

import sys

from infl_jax.main import main

if __name__ == "__main__":
  sys.exit(main())
