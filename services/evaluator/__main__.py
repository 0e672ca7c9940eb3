"""`python -m services.evaluator`: run the evaluator worker."""

import sys

if "--health" in sys.argv[1:]:  # the image's HEALTHCHECK: nothing heavy imported
    from shared.health import health_exit_code

    raise SystemExit(health_exit_code("evaluator"))

from services.evaluator.main import main  # noqa: E402

raise SystemExit(main())
