"""`python -m fractal_mlops <command> ...`: the same dispatch as the `fractal-mlops` script."""

import sys

from fractal_mlops.cli import main

sys.exit(main())
