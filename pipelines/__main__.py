"""`python -m unipt.pipelines ...` is the `unipt` command."""

import sys

from .cli import main

sys.exit(main())
