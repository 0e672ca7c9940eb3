"""`python -m services.api`: serve the control plane."""

from services.api.main import main

raise SystemExit(main())
