"""HTTP: the ingest server, the worker's views and definitions API, routing to owners, metrics."""
