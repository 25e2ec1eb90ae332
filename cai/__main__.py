"""`python -m cai`: the same as the `cai` command."""

import sys

from cai.cli import main

sys.exit(main())
