"""The dataprep service."""
