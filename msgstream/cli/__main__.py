"""``python -m msgstream.cli``: the ``msgstream`` console script."""

from . import main

raise SystemExit(main())
