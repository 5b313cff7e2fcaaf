"""Runs ``infl-privacy`` from a checkout without installing the console script."""

import sys

from infl_jax.privacy.main import main

if __name__ == "__main__":
  sys.exit(main())
