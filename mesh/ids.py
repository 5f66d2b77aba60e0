"""Distinct id types so a peer id is never passed where a model id is expected."""

from typing import NewType

#: A libp2p peer id in its base58 text form (``12D3KooW...`` for ed25519 keys).
NodeId = NewType("NodeId", str)
#: A model identifier as users type it (``smollm2-135m-instruct``, ``org/repo``).
ModelId = NewType("ModelId", str)
