"""The service layer, free of Ray: REST API (api/), job store and its whole Redis protocol (store/), event
fan-out (events.py), the ingress's dispatch and reconcile loops (dispatch.py) and readiness
(readiness.py), a generator replica's work (generator.py) and its job runner, storage, webhooks
(webhooks.py, with the SSRF guard in netguard.py), validation, settings and errors.
The Ray Serve adapters in deployments/serve/ wire it to deployments; the tests run it without Ray."""
