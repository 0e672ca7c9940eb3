"""`python -m services.dataprep`: run the dataprep worker."""

from services.dataprep.main import main

raise SystemExit(main())
