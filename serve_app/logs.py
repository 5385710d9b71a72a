"""serve_app's log lines inside Serve's replicas go through Ray Serve's own logger: the same
files (logs/serve/replica_<app>_<deployment>_<id>.log), the same format (the config's
`server.logging`, e.g. JSON with request and replica ids), the same level."""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"
OURS = "serve_app"


def under_serve_logger() -> None:
    """Call in a Serve replica's constructor (router or model), once Serve has set its logger up."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    ours = logging.getLogger(OURS)
    if not serve_logger.handlers:
        return  # not inside Serve: leave logging as the process set it up
    ours.handlers = list(serve_logger.handlers)
    ours.setLevel(serve_logger.getEffectiveLevel())
    ours.propagate = False
