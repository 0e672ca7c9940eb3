"""`python -m services.dataprep`: run the dataprep worker."""

import sys

if "--health" in sys.argv[1:]:  # the image's HEALTHCHECK: nothing heavy imported
    from shared.health import health_exit_code

    raise SystemExit(health_exit_code("dataprep"))

from services.dataprep.main import main  # noqa: E402

raise SystemExit(main())
