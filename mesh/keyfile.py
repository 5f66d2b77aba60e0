"""The persistent identity key in the data dir: PKCS#8 PEM, mode 0600, written atomically (temp file,
fsync, rename) so a crash never leaves a broken identity behind."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh.errors import IdentityError
from mesh.fsutil import atomic_write
from mesh.identity import Identity

log = logging.getLogger(__name__)
IDENTITY_FILE = "identity.key"


def load_or_create(data_dir: Path) -> Identity:
    """Load ``data_dir/identity.key``, or create it on first start (atomic write, mode 0600)."""
    path = data_dir / IDENTITY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not a PEM ed25519 private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
        identity = Identity(key)
        log.info("identity loaded node_id=%s path=%s", identity.node_id, path)
        return identity
    identity = Identity.generate()
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, mode=0o600)
    log.info("identity created node_id=%s path=%s", identity.node_id, path)
    return identity
