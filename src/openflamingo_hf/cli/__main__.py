"""`python -m openflamingo_hf.cli ...` runs the `openflamingo` command."""

import sys

from .main import main

sys.exit(main())
