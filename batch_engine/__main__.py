"""``python -m batch_engine``: the same as the ``batch-engine`` command."""

import sys

from batch_engine.cli import main

sys.exit(main())
