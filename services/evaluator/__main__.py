"""`python -m services.evaluator`: run the evaluator worker."""

from services.evaluator.main import main

raise SystemExit(main())
