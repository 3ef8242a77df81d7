"""Serving: ``streamt1 serve`` (FastAPI over one multi-stream engine) and a Ray Serve deployment.

Needs the ``serve`` extra (``ray_app`` also the ``ray`` extra); importing this package does not."""
