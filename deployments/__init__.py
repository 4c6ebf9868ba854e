"""The service: `service/` (Ray-free: REST API, job store, runner, storage, webhooks) and `serve/` (the
Ray Serve deployments and app builder). This package may import FastAPI and Redis, and `serve/` Ray;
`musicgen` (the library) may not."""
