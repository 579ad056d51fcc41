"""``python -m finercam``: the ``finercam`` command."""

from finercam.cli import main

raise SystemExit(main())
