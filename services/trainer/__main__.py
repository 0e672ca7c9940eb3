"""`python -m services.trainer`: run the trainer worker."""

from services.trainer.main import main

raise SystemExit(main())
