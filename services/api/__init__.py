"""The FastAPI control plane: jobs, models, health."""
