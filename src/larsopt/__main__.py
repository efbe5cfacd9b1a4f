"""``python -m larsopt``: the ``larsopt`` command."""

from larsopt.cli import main

raise SystemExit(main())
