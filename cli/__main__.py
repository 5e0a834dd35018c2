"""`python -m cli`: the same as the `fbhook` console script."""

import sys

from cli.main import main

sys.exit(main())
