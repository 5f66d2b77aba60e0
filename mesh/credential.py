"""This peer's membership of a closed mesh, kept in its data dir: ``membership.cbor`` (mode 0600, written
atomically, refused when others may read it) holds its certificate chain, the other members' chains and the
revocations it has seen (so a restart needs no token and still refuses who was revoked), and the invites it
issued — the hashes of their secrets only, so a copy of the data dir admits nobody."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cbor2

from mesh import admission as adm
from mesh.errors import LocalError, PeerError
from mesh.fsutil import atomic_write, read_private
from mesh.identity import Identity
from mesh.wire import Reader, loads_cbor

log = logging.getLogger(__name__)
MEMBERSHIP_FILE = "membership.cbor"
VERSION = 1
MAX_FILE = 64 * 1024 * 1024


class MembershipError(LocalError):
    code = "INVALID_MEMBERSHIP"


@dataclass
class Membership:
    chain: list[bytes]  # this peer's own credential
    roster: adm.Roster
    invites: adm.InviteBook

    @property
    def mesh(self) -> str:
        return self.roster.mesh


def found(data_dir: Path, identity: Identity, now: float) -> Membership:
    """A new mesh founded by this peer, saved."""
    chain = adm.found(identity, now)
    m = Membership(chain, adm.Roster.of(chain), adm.InviteBook())
    save(data_dir, m)
    log.info("founded mesh %s", m.mesh, extra={"event": "mesh_founded", "mesh": m.mesh})
    return m


def joined(data_dir: Path, chain: list[bytes], identity: Identity) -> Membership:
    """The membership a redeemed invite gave this peer, saved (its chain must end with this peer)."""
    roster = adm.Roster.of(chain)
    roster.admit(chain, identity.node_id)
    m = Membership(list(chain), roster, adm.InviteBook())
    save(data_dir, m)
    return m


def save(data_dir: Path, m: Membership) -> None:
    raw = cbor2.dumps({
        "version": VERSION, "chain": m.chain,
        "members": list(m.roster.chains.values()),
        "revocations": list(m.roster.revocations.values()),
        "invites": {k: [r.expires, r.uses_left, r.created] for k, r in m.invites.records.items()},
    })
    atomic_write(data_dir / MEMBERSHIP_FILE, raw, mode=0o600)


def load(data_dir: Path, identity: Identity) -> Membership | None:
    """This peer's saved membership, or None when its data dir belongs to no mesh. INVALID_MEMBERSHIP for a
    damaged file or one that is not this peer's (another identity's chain); INSECURE_PERMISSIONS when others
    may read it."""
    path = data_dir / MEMBERSHIP_FILE
    try:
        raw = read_private(path)
    except FileNotFoundError:
        return None
    try:
        r = Reader(loads_cbor(raw, MAX_FILE), "membership")
        if r.integer("version") != VERSION:
            raise MembershipError(f"{path}: membership version is not supported")
        chain = _blobs(r.raw("chain"), "chain")
        roster = adm.Roster.of(chain)
        for data in _blobs(r.raw("revocations", []), "revocations"):
            roster.revoke_known(data)
        for other in r.raw("members", []):
            try:
                roster.add_chain(_blobs(other, "members"))
            except PeerError:
                continue  # revoked since, or through someone revoked: no longer a member
        roster.admit(chain, identity.node_id)
        invites = adm.InviteBook()
        table = r.raw("invites", {})
        if not isinstance(table, dict):
            raise MembershipError(f"{path}: invites is not a map")
        for key, row in table.items():
            if not (isinstance(key, str) and isinstance(row, list) and len(row) == 3):
                raise MembershipError(f"{path}: a damaged invite record")
            invites.records[key] = adm.InviteRecord(float(row[0]), int(row[1]), float(row[2]))
    except PeerError as exc:
        raise MembershipError(f"{path} cannot be used ({exc.code}: {exc}); move it away to start anew, or "
                              f"join again with an invite") from None
    return Membership(chain, roster, invites)


def _blobs(raw: object, what: str) -> list[bytes]:
    if not isinstance(raw, list) or not all(isinstance(b, bytes) for b in raw):
        raise MembershipError(f"membership.{what}: expected a list of byte strings")
    return raw
