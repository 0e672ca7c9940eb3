"""`python -m services.cli`: the termtune command line."""

from services.cli.main import main

raise SystemExit(main())
