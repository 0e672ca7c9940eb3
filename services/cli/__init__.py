"""The `termtune` command line: launch the services, submit and follow jobs, invoke models."""
