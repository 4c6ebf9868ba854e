"""The service: Ray Serve deployments, the Redis job store and the REST API (issue 4, in progress).

This package may import Ray, FastAPI and Redis; `musicgen` (the library) may not.
"""
