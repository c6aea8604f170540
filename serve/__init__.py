"""The Insight Ray Serve application: HTTP API, browser page, deployments.

``serve.app:build_app`` is the import path `serve run serve/config.yaml`, a
RayService and `insight serve` deploy. The model code (backbone, SAE, concept
table) comes from the ``insight`` package; this folder only adds serving:
bounded request parsing, safe image decoding, batching, rendering, the page.
Everything but ``app``/``deployments`` runs without Ray, so the benchmark can
do the same work in-process (``serve.engine`` + ``serve.render``).
"""
