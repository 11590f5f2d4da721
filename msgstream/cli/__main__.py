"""``python -m msgstream.cli``: the ``msgstream`` console script."""

from . import console

raise SystemExit(console())
