"""Logging set-up: human-readable lines, or one JSON object per line with ``--log-json``.

Structured fields travel as ``extra={...}``: ``event`` (what happened), ``code`` (a stable error code),
``node_id``, ``peer`` and so on; the JSON formatter emits every one of them.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.converter = time.gmtime


def setup(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # `import libp2p` sets its logger to WARNING with propagate=False, so its warnings would bypass
    # this configuration; route them through ours, and keep its chatter at WARNING.
    lib = logging.getLogger("libp2p")
    lib.propagate = True
    lib.handlers[:] = []
    lib.setLevel(logging.WARNING if level.lower() != "debug" else logging.INFO)
    for chatty in ("httpx", "httpx2", "httpcore"):  # one INFO line per HTTP request (huggingface_hub's client)
        logging.getLogger(chatty).setLevel(logging.WARNING if level.lower() != "debug" else logging.DEBUG)


class Throttle:
    """At most one log line per key every ``every`` seconds; counts the lines held back in between.

    A hostile or broken peer repeating the same bad message must not fill the disk of a node that runs
    for weeks. The table is bounded: past ``max_keys`` the oldest key is dropped (it may log once more).
    """

    def __init__(self, every: float = 10.0, max_keys: int = 1024) -> None:
        self.every = every
        self.max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}  # key -> (when last logged, held back since)

    def allow(self, key: object, now: float) -> int | None:
        """None: hold this line back. Otherwise log it, noting the returned count of lines held back."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last.pop(key, None)
        if len(self._last) >= self.max_keys:
            del self._last[next(iter(self._last))]  # insertion order: the longest-quiet key
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0
