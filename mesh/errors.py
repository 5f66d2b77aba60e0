"""One small error hierarchy for the whole project, and one table of its codes.

Every error carries a stable ``code`` (an upper-case string) that travels unchanged into logs, wire
replies and HTTP answers, and says whose fault it is: ``PeerError`` for bad input from another peer or
an API client, ``LocalError`` for problems of this peer (configuration, disk, identity). ``CODES`` is the
one place a code is defined: its HTTP status and its meaning. An error's ``http_status`` comes from there,
whichever class raised it; the README's list is this table (``python -m mesh.errors`` prints it), and a
test checks that every code the source raises is in it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    status: int  # the HTTP status of an API answer carrying it
    meaning: str


def _table(*rows: tuple[str, int, str]) -> dict[str, Code]:
    return {code: Code(status, meaning) for code, status, meaning in rows}


CODES: dict[str, Code] = _table(
    # generic
    ("MESH_ERROR", 500, "an error without a more specific code"),
    ("BAD_INPUT", 400, "input from a peer or client was wrong (no more specific code)"),
    ("LOCAL_ERROR", 500, "a problem of this peer itself (no more specific code)"),
    ("BAD_REQUEST", 400, "an HTTP body that is not a JSON object"),
    ("MISSING_PARAMETER", 400, "a required parameter is absent or empty"),
    ("INVALID_PARAMETER", 400, "a parameter has the wrong type or is out of range"),
    ("NOT_FOUND", 404, "no such thing here"),
    ("METHOD_NOT_ALLOWED", 405, "the endpoint does not take this HTTP method"),
    ("API_UNREACHABLE", 503, "the CLI cannot reach the peer's HTTP API"),
    ("HTTP_ERROR", 502, "the peer's API answered an HTTP error without a JSON error body"),
    ("UNAUTHORIZED", 401, "an API request without the peer's API token (Authorization: Bearer TOKEN)"),
    ("INSECURE_PERMISSIONS", 500, "a secret file (the API token) that group or others may read: chmod 600 it"),
    ("INTERNAL", 500, "an unexpected failure in one request or stream handler (logged; the peer goes on)"),
    # wire and membership
    ("MALFORMED_MESSAGE", 400, "bytes that are not a well-formed message (CBOR, types, fields)"),
    ("MESSAGE_TOO_LARGE", 413, "a message or tensor over its size limit"),
    ("BAD_SIGNATURE", 401, "a signature that does not verify"),
    ("UNKNOWN_MESSAGE_KIND", 400, "an envelope of a kind this peer does not know or expect"),
    ("UNSUPPORTED_VERSION", 400, "an envelope or schema version this peer does not speak"),
    ("INVALID_CAPABILITY_SCHEMA", 400, "node capabilities in an unknown schema version"),
    ("NODE_ID_CONFLICT", 409, "another key claims this node id"),
    ("UNKNOWN_NODE", 404, "no such peer in the membership table"),
    ("INVALID_CONFIG", 500, "a configuration file or option is wrong"),
    ("INVALID_IDENTITY", 500, "the identity key file cannot be used"),
    # admission to a closed mesh (mesh.admission, mesh.credential)
    ("NOT_A_MEMBER", 403, "a peer that holds no valid membership of this mesh (join with an invite: meshnode invite)"),
    ("INVALID_CREDENTIAL", 401, "a membership credential whose certificate chain does not hold"),
    ("CREDENTIAL_SIGNER_MISMATCH", 401, "a certificate or revocation not signed by the member it names"),
    ("NOT_BOUND", 401, "a credential presented by another peer than the one it admits (replayed)"),
    ("WRONG_MESH", 403, "a credential, invite or revocation of another mesh"),
    ("REVOKED", 403, "a peer that was revoked, or whose credential runs through a revoked member"),
    ("REVOKE_ROOT", 400, "the founder of a mesh cannot be revoked"),
    ("TOO_MANY_REVOCATIONS", 400, "more revocations than a peer keeps"),
    ("CHAIN_TOO_LONG", 400, "a member too many admissions from the founder to admit more"),
    ("INVALID_INVITE", 400, "not an invite token, or a damaged one"),
    ("INVITE_UNKNOWN", 404, "the member asked issued no such invite"),
    ("INVITE_EXPIRED", 410, "the invite has expired: ask a member for a new one"),
    ("INVITE_USED_UP", 410, "the invite has been used as often as it allows"),
    ("INVALID_MEMBERSHIP", 500, "the data dir's membership file cannot be used"),
    ("OPEN_MESH", 409, "this peer runs an open mesh (--open): it has no members, invites or revocations"),
    ("MESH_MODE_MISMATCH", 409, "an open peer and a closed one meet: they refuse each other"),
    # transport
    ("DIAL_FAILED", 502, "no address of the peer could be dialed"),
    ("BAD_MULTIADDR", 400, "not a usable multiaddr"),
    ("NOT_LOOPBACK", 400, "a loopback-only tool was given another address"),
    ("PEER_TIMEOUT", 504, "the peer did not answer in time"),
    ("PEER_UNRESPONSIVE", 504, "a route's peer stopped producing tokens and did not answer a ping (a hung peer)"),
    ("PEER_DISCONNECTED", 502, "the connection to a route's peer went away (its process died)"),
    ("PEER_UNREACHABLE", 502, "no connection to the peer"),
    ("STREAM_CLOSED", 502, "the peer closed or reset the stream"),
    ("BAD_PING_REPLY", 502, "the peer answered a ping with other bytes"),
    ("CHURN_CLIENT_FAILED", 500, "the churn benchmark's client process failed"),
    # storage
    ("MESH_BUSY", 429, "every pipeline slot and queue place for the model is taken: retry after Retry-After seconds"),
    ("MODEL_NOT_AVAILABLE", 503, "the model is not ready here or not served yet (see reason)"),
    ("MODEL_SOURCE_UNAVAILABLE", 404, "a model source (folder, hub id, GGUF) cannot be found or read"),
    ("UNKNOWN_MODEL", 404, "no such model or version in the store"),
    ("INVALID_MODEL_ID", 400, "a text that cannot name a model"),
    ("UNSUPPORTED_ARCHITECTURE", 422, "a model family that stages cannot run"),
    ("NO_CONFIG", 422, "a model folder without config.json"),
    ("BAD_CONFIG", 422, "a config.json that cannot be read or is not a JSON object"),
    ("NO_WEIGHTS", 422, "a model folder without safetensors weights"),
    ("MALFORMED_SAFETENSORS", 400, "a safetensors file that is cut short or inconsistent"),
    ("MALFORMED_GGUF", 422, "a GGUF file that is not readable as GGUF"),
    ("UNSUPPORTED_QUANTIZATION", 422, "a tensor type or quantization the project does not handle"),
    ("CONVERSION_FAILED", 500, "converting a model's weights failed"),
    ("INVALID_WEIGHTS", 400, "a weight format that is not one of auto|float32|bfloat16|float16|int8|int4"),
    ("SHARD_SIZE_MISMATCH", 422, "a shard's size differs from its manifest"),
    ("SHARD_HASH_MISMATCH", 422, "a shard's SHA256 (or one of its pieces') differs from its manifest"),
    ("SHARD_FORMAT_MISMATCH", 422, "a shard's tensors are not in the format its manifest records"),
    ("SHARD_INCOMPLETE", 500, "a stage's shards lack or add tensors"),
    ("MANIFEST_SIGNER_MISMATCH", 401, "a manifest signed by another key than its holder's"),
    ("MANIFEST_MISMATCH", 502, "a holder's manifest differs from the one asked for"),
    ("BLOB_NOT_FOUND", 404, "no shard or file with that SHA256 here"),
    ("FILE_NOT_FOUND", 404, "the model version has no such file"),
    ("OFFSET_OUT_OF_RANGE", 400, "a read past the end of a file"),
    ("INVALID_PATH", 400, "a storage path that is malformed or escapes the store"),
    ("UNKNOWN_TRANSFER", 404, "no such transfer"),
    ("INVALID_TRANSFER_STATE", 409,
     "a transfer cannot be paused, resumed or cancelled in its state (e.g. resume a done one)"),
    ("TRANSFER_NOT_CONTROLLABLE", 409,
     "a stage's own fetch: only the transfers users start can be paused or cancelled"),
    ("INSUFFICIENT_STORAGE", 507, "the store's disk cannot hold the model (refused before any byte; the message "
                                  "says needed and free bytes), or it filled while a file was written"),
    ("TRANSFER_FAILED", 502, "a model's files could not be fetched from any holder"),
    ("LOCK_HELD", 409, "another process holds the lock"),
    ("REGISTRY_CORRUPT", 500, "the model registry file cannot be read"),
    ("STORE_IO", 500, "reading or writing the store failed"),
    # planning
    ("PLAN_INFEASIBLE", 409, "the layers do not fit on these peers"),
    ("INVALID_PLAN_INPUT", 400, "planner input (layers, nodes, splits) that is malformed"),
    ("NOT_COORDINATOR", 409, "only the coordinator plans; this peer is not it"),
    ("PLAN_SIGNER_MISMATCH", 401, "a plan not signed by the coordinator of its term"),
    ("NO_PLAN", 404, "no plan for that model on this peer"),
    # inference
    ("BAD_FRAME", 400, "an activation frame that is malformed"),
    ("BAD_DTYPE", 400, "activations in another dtype than the plan's"),
    ("BAD_SHAPE", 400, "activations of the wrong shape"),
    ("BAD_VALUES", 400, "activations with NaN or infinity"),
    ("CONTEXT_TOO_LONG", 400, "more positions than the model's context"),
    ("UNKNOWN_SESSION", 404, "no such generation session here"),
    ("SESSION_EXISTS", 409, "the session is already open here"),
    ("STEP_MISMATCH", 409, "a step out of order for its session"),
    ("TOO_MANY_SESSIONS", 429, "the stage holds as many sessions as it may"),
    ("POSITION_MISMATCH", 409, "positions that do not continue the stage's cache"),
    ("NOT_IN_ROUTE", 400, "a frame from a peer that is not the previous hop of the route"),
    ("INVALID_STAGE", 500, "a stage range outside the model's layers"),
    ("INVALID_COMPUTE_DTYPE", 400, "a compute dtype that is not auto|float32|bfloat16"),
    ("STAGE_NOT_READY", 503, "this peer's stage is still loading"),
    ("STAGE_LOAD_FAILED", 500, "this peer's stage could not be loaded"),
    ("NEXT_HOP_FAILED", 502, "the next stage of the route failed"),
    ("GENERATION_FAILED", 503, "the generation could not be completed (the cause is in the message)"),
    ("TOKENIZER_UNAVAILABLE", 400, "the model has no tokenizer, so it takes token ids only"),
)


class MeshError(Exception):
    """Base class. ``code`` is stable and machine-readable; ``str(err)`` is for people."""

    code: str = "MESH_ERROR"
    _status: int | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def http_status(self) -> int:
        """The status an API answer carrying this error uses: its code's (``CODES``), unless set."""
        if self._status is not None:
            return self._status
        known = CODES.get(self.code)
        return known.status if known else 500

    @http_status.setter
    def http_status(self, status: int) -> None:  # an HTTP layer's own refusal (e.g. 405) keeps its status
        self._status = status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class PeerError(MeshError):
    """Something another peer (or an API client) sent was wrong. Never fatal to this peer."""

    code = "BAD_INPUT"


class LocalError(MeshError):
    """Something about this peer itself is wrong (config, identity file, disk)."""

    code = "LOCAL_ERROR"


class DecodeError(PeerError):
    """Bytes are not a well-formed message: oversize, not CBOR, wrong types, missing fields."""

    code = "MALFORMED_MESSAGE"


class OversizeError(DecodeError):
    code = "MESSAGE_TOO_LARGE"


class SignatureError(PeerError):
    code = "BAD_SIGNATURE"


class SchemaVersionError(PeerError):
    code = "INVALID_CAPABILITY_SCHEMA"


class NodeIdConflictError(PeerError):
    code = "NODE_ID_CONFLICT"


class ConfigError(LocalError):
    code = "INVALID_CONFIG"


class IdentityError(LocalError):
    code = "INVALID_IDENTITY"


class NotFoundError(PeerError):
    code = "NOT_FOUND"


def markdown() -> str:
    """The table as the README shows it."""
    rows = ["| code | HTTP | meaning |", "| --- | ---: | --- |"]
    rows += [f"| `{code}` | {c.status} | {c.meaning} |" for code, c in CODES.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
