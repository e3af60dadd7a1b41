"""`python -m benchmarks --help`: see `benchmarks.runner`."""

import sys

from benchmarks.runner import main

sys.exit(main())
