"""Logging that an operator can read: the access lines of health probes and scrapes are left out.

A load balancer polls ``/ready`` every few seconds and Prometheus scrapes ``/metrics``; logged,
their lines bury what the server says while it starts (model conversion, covariance progress).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

#: Paths that orchestrators and scrapers poll: not access-logged unless they answer 500.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


class QuietPolls(logging.Filter):
    """Drop uvicorn access records of :data:`QUIET_PATHS`, the 503 of a server still starting
    included; a 500 there is a fault and keeps its line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client, method, path with query, http version, status).
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        path, status = str(args[2]).split("?", 1)[0], args[4]
        return path not in QUIET_PATHS or status == 500


def uvicorn_logging() -> dict[str, Any]:
    """uvicorn's own logging configuration with :class:`QuietPolls` on its access lines."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_polls"] = {"()": QuietPolls}
    config["handlers"]["access"].setdefault("filters", []).append("quiet_polls")
    return config
