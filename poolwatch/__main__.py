"""``python -m poolwatch``: the ``poolwatch`` command."""

from ._cli import main

raise SystemExit(main())
