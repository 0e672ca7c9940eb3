"""`python -m services.trainer`: run the trainer worker."""

import sys

if "--health" in sys.argv[1:]:  # the image's HEALTHCHECK: nothing heavy imported
    from shared.health import health_exit_code

    raise SystemExit(health_exit_code("trainer"))

from services.trainer.main import main  # noqa: E402

raise SystemExit(main())
