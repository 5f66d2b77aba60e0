"""One small error hierarchy for the whole project.

Every error carries a stable ``code`` (an upper-case string) that travels unchanged into logs, wire
replies and HTTP answers, and says whose fault it is: ``PeerError`` for bad input from another peer or
an API client, ``LocalError`` for problems of this peer (configuration, disk, identity).
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class. ``code`` is stable and machine-readable; ``str(err)`` is for people."""

    code: str = "MESH_ERROR"
    #: HTTP status that an API answer carrying this error should use.
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class PeerError(MeshError):
    """Something another peer (or an API client) sent was wrong. Never fatal to this peer."""

    code = "BAD_INPUT"
    http_status = 400


class LocalError(MeshError):
    """Something about this peer itself is wrong (config, identity file, disk)."""

    code = "LOCAL_ERROR"
    http_status = 500


class DecodeError(PeerError):
    """Bytes are not a well-formed message: oversize, not CBOR, wrong types, missing fields."""

    code = "MALFORMED_MESSAGE"


class OversizeError(DecodeError):
    code = "MESSAGE_TOO_LARGE"
    http_status = 413


class SignatureError(PeerError):
    code = "BAD_SIGNATURE"
    http_status = 401


class SchemaVersionError(PeerError):
    code = "INVALID_CAPABILITY_SCHEMA"


class NodeIdConflictError(PeerError):
    code = "NODE_ID_CONFLICT"
    http_status = 409


class ConfigError(LocalError):
    code = "INVALID_CONFIG"


class IdentityError(LocalError):
    code = "INVALID_IDENTITY"


class NotFoundError(PeerError):
    code = "NOT_FOUND"
    http_status = 404
