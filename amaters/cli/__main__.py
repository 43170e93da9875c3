"""``python -m amaters.cli``: the same as the ``amaters`` command."""

from amaters.cli import main

raise SystemExit(main())
