"""The peer's ed25519 identity and message signatures (pure; the key file is ``mesh.keyfile``).

The same 32-byte ed25519 seed is the libp2p host key, so ``node_id`` is the libp2p peer id.
"""

from __future__ import annotations

from dataclasses import dataclass

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh.errors import SignatureError
from mesh.ids import NodeId

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# libp2p's protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, then an identity multihash (code 0x00,
# length 36) around it: this is how a libp2p peer id is derived from an ed25519 key.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, PUBLIC_KEY_SIZE])
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, len(_LIBP2P_ED25519_PREFIX) + PUBLIC_KEY_SIZE])


def node_id_for_key(public_key: bytes) -> NodeId:
    """The libp2p peer id (base58 text) owned by a raw 32-byte ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"ed25519 public key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    digest = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX + public_key
    return NodeId(base58.b58encode(digest).decode("ascii"))


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public_key``'s ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise SignatureError("malformed key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        raise SignatureError("signature does not match the signer's key") from None


@dataclass(frozen=True)
class Identity:
    """An ed25519 key pair; ``node_id`` is its libp2p peer id."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed (what libp2p's ed25519 key pair is built from)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> NodeId:
        return node_id_for_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)
