"""Allow ``python -m sdproxy``."""

from sdproxy.cli import main

raise SystemExit(main())
