"""`python -m limoe` is the `limoe` command."""

import sys

from limoe.cli import main

sys.exit(main())
