"""The HTTP service: FastAPI routes around the cascade runtime, with dynamic batching, limits and metrics."""
