"""``python -m batch_engine``: the same as the ``batch-engine`` command."""

from batch_engine.cli import entry

entry()
