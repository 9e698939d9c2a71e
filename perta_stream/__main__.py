"""`python -m perta_stream ...` is the `perta-stream` command line."""

import sys

from perta_stream.cli import main

sys.exit(main())
