"""`python -m hart_fast` is the `hart-fast` command."""

import sys

from hart_fast.cli import main

sys.exit(main())
