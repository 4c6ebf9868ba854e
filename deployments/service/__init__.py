"""The service layer, free of Ray: REST API (api/), job store and its whole Redis protocol (store/), event
fan-out (events.py), the worker's job runner, storage, webhooks (webhooks.py, with the SSRF guard in
netguard.py), validation, settings and errors.
The Ray Serve adapters in deployments/serve/ wire it to deployments; the tests run it without Ray."""
