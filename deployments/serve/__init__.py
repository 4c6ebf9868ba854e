"""The Ray Serve adapters of the service and the app builder (`deployments.serve.app:build_app`): the
only part of the project that imports Ray."""
