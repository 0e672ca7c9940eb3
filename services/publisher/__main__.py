"""`python -m services.publisher`: run the publisher worker."""

from services.publisher.main import main

raise SystemExit(main())
