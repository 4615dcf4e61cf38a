"""`python -m cnnray.cli ARGS`: the `cnnray` program."""

import sys

from cnnray.cli import main

sys.exit(main())
