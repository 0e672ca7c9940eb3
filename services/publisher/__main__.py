"""`python -m services.publisher`: run the publisher worker."""

import sys

if "--health" in sys.argv[1:]:  # the image's HEALTHCHECK: nothing heavy imported
    from shared.health import health_exit_code

    raise SystemExit(health_exit_code("publisher"))

from services.publisher.main import main  # noqa: E402

raise SystemExit(main())
