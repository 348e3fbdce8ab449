"""``python -m sdft.serve``."""

import sys

from sdft.serve.cli import main

sys.exit(main())
