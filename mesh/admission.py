"""Admission to a closed mesh: who is a member, proved without giving a stranger anything to replay. Pure; no
I/O, no clock (times are arguments).

A mesh is named by its founder's key: ``mesh_id`` is derived from the founder's public key (``mesh_id_for``),
and the founder's node id is the root of trust. A member holds a *certificate chain*::

    [root cert, cert_1, ..., cert_n]     root cert: issued by the founder to itself
                                         cert_i: issued by the member of cert_{i-1} to the member of cert_i

Each ``Certificate`` (mesh, member, issuer, issued_at, invite) travels in a signed envelope (kind
``member``) sealed by its issuer's identity key; a chain is valid when the first is the founder's own, every
next one is signed by the member before it, all name this mesh, it is at most ``MAX_DEPTH`` long, and no
member on it is revoked. A chain proves membership only for the peer id it ends with: libp2p's Noise
handshake already authenticates the remote peer id, so the holder compares the chain's last member with that
id (``Roster.admit``), and a chain copied by a stranger proves nothing for the stranger (``NOT_BOUND``).

An ``Invite`` is a bearer token (one line: ``meshnode-invite-`` + base58 of its CBOR) naming the mesh, the
member that issued it, a random secret, an expiry and addresses to dial. The issuer keeps only the secret's
hash, its expiry and its uses left (``InviteBook``); a new peer redeems the token at the issuer, which issues
the newcomer's certificate (bound to the newcomer's authenticated peer id) and counts the use.

A ``Revocation`` (mesh, revoked, by, at), sealed by any member, removes a member: every chain through the
revoked peer stops being valid — the certificates and invites it issued die with it, so a member it admitted
must be invited again (a revoked peer may have admitted anyone). The founder cannot be revoked.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import base58
import cbor2

from mesh.errors import DecodeError, PeerError
from mesh.identity import Identity, node_id_for_key
from mesh.wire import MAX_LIST, MAX_STR, Reader, loads_cbor, open_envelope, seal, versioned

CERT, REVOCATION = "member", "revocation"
VERSION = 1
MAX_DEPTH = 16  # certificates in one chain
MAX_CHAIN_BYTES = 16 * 1024
MAX_INVITE_CHARS = 2048
MAX_REVOCATIONS = 4096
INVITE_PREFIX = "meshnode-invite-"
SECRET_BYTES = 16


class AdmissionError(PeerError):
    """A credential, invite or revocation that does not admit (the code says why)."""

    code = "NOT_A_MEMBER"


def mesh_id_for(root_public_key: bytes) -> str:
    """A mesh's name: ``mesh-`` and 16 base58 characters of the founder's key's SHA256."""
    return "mesh-" + base58.b58encode(hashlib.sha256(b"meshnode/mesh/v1\x00" + root_public_key).digest())[:16].decode()


def secret_hash(secret: bytes) -> str:
    return hashlib.sha256(b"meshnode/invite/v1\x00" + secret).hexdigest()


# ---- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Certificate:
    mesh: str
    member: str  # node id admitted
    issuer: str  # node id of the member that admitted it (the founder for itself)
    issued_at: float
    invite: str = ""  # hash of the invite's secret it was redeemed with ("" for the founder)
    root_key: bytes = b""  # the founder's public key, in the founder's own certificate only


def encode_cert(c: Certificate) -> bytes:
    return cbor2.dumps({"version": VERSION, "mesh": c.mesh, "member": c.member, "issuer": c.issuer,
                        "issued_at": c.issued_at, "invite": c.invite, "root_key": c.root_key})


def seal_cert(c: Certificate, issuer: Identity) -> bytes:
    if issuer.node_id != c.issuer:
        raise ValueError("a certificate is sealed by the member it names as issuer")
    return seal(CERT, encode_cert(c), issuer)


def _opened(data: bytes, kind: str, what: str) -> tuple[Reader, str]:
    """A verified envelope of ``kind``: a reader over its payload, and the node id that signed it."""
    env = open_envelope(data, limit=MAX_CHAIN_BYTES)
    if env.kind != kind:
        raise DecodeError(f"expected a {what}, got {env.kind!r}", code="UNKNOWN_MESSAGE_KIND")
    return versioned(env.payload, what, VERSION, limit=MAX_CHAIN_BYTES), node_id_for_key(env.public_key)


def open_cert(data: bytes) -> Certificate:
    """A verified certificate: its envelope's signer is its issuer (BAD_SIGNATURE, MALFORMED_MESSAGE,
    UNSUPPORTED_VERSION, CREDENTIAL_SIGNER_MISMATCH otherwise)."""
    r, signer = _opened(data, CERT, "certificate")
    root_key = r.raw("root_key", b"")
    if not isinstance(root_key, bytes) or len(root_key) > 64:
        raise DecodeError("certificate.root_key: expected at most 64 bytes")
    c = Certificate(mesh=_short(r, "mesh"), member=_short(r, "member"), issuer=_short(r, "issuer"),
                    issued_at=r.number("issued_at"), invite=_short(r, "invite", ""), root_key=root_key)
    if signer != c.issuer:
        raise AdmissionError(f"certificate for {c.member} names issuer {c.issuer} but is signed by {signer}",
                             code="CREDENTIAL_SIGNER_MISMATCH")
    return c


def encode_chain(chain: list[bytes]) -> bytes:
    return cbor2.dumps({"version": VERSION, "chain": list(chain)})


def decode_chain(data: bytes) -> list[bytes]:
    r = versioned(data, "credential", VERSION, limit=MAX_CHAIN_BYTES)
    chain = r.raw("chain")
    if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_DEPTH or not all(isinstance(c, bytes) for c in chain):
        raise DecodeError(f"credential.chain: expected 1 to {MAX_DEPTH} certificates")
    return chain


def verify_chain(chain: list[bytes], mesh: str) -> list[Certificate]:
    """The certificates of a chain that is valid for ``mesh`` (revocations aside: ``Roster`` checks those)."""
    if not 1 <= len(chain) <= MAX_DEPTH:
        raise AdmissionError(f"a credential holds 1 to {MAX_DEPTH} certificates, not {len(chain)}",
                             code="INVALID_CREDENTIAL")
    certs = [open_cert(c) for c in chain]
    root = certs[0]
    if root.member != root.issuer or not root.root_key or node_id_for_key(root.root_key) != root.issuer:
        raise AdmissionError("a credential starts with the founder's own certificate", code="INVALID_CREDENTIAL")
    if mesh_id_for(root.root_key) != mesh:
        raise AdmissionError(f"credential of mesh {mesh_id_for(root.root_key)}, not {mesh}", code="WRONG_MESH")
    for before, cert in itertools.pairwise(certs):
        if cert.mesh != mesh or cert.issuer != before.member or cert.member == cert.issuer:
            raise AdmissionError(f"certificate of {cert.member} does not continue the chain at {before.member}",
                                 code="INVALID_CREDENTIAL")
    if root.mesh != mesh:
        raise AdmissionError(f"certificate of mesh {root.mesh}, not {mesh}", code="WRONG_MESH")
    return certs


# ---- revocations -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revocation:
    mesh: str
    revoked: str
    by: str
    at: float


def seal_revocation(rev: Revocation, by: Identity) -> bytes:
    if by.node_id != rev.by:
        raise ValueError("a revocation is sealed by the member it names")
    return seal(REVOCATION, cbor2.dumps({"version": VERSION, "mesh": rev.mesh, "revoked": rev.revoked,
                                         "by": rev.by, "at": rev.at}), by)


def open_revocation(data: bytes) -> Revocation:
    r, signer = _opened(data, REVOCATION, "revocation")
    rev = Revocation(mesh=_short(r, "mesh"), revoked=_short(r, "revoked"), by=_short(r, "by"), at=r.number("at"))
    if signer != rev.by:
        raise AdmissionError(f"revocation names {rev.by} but is signed by {signer}", code="CREDENTIAL_SIGNER_MISMATCH")
    return rev


# ---- the roster: what one peer knows ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberView:
    node_id: str
    admitted_by: str
    admitted_at: float
    depth: int  # 0 for the founder


@dataclass
class Roster:
    """The members and revocations of one mesh as this peer knows them. Chains are kept as received (to
    pass on); a member counts while its chain holds no revoked peer."""

    mesh: str
    root: str  # the founder's node id
    chains: dict[str, list[bytes]] = field(default_factory=dict)  # member -> its chain (sealed certificates)
    certs: dict[str, list[Certificate]] = field(default_factory=dict)
    revocations: dict[str, bytes] = field(default_factory=dict)  # revoked -> the sealed revocation

    @classmethod
    def of(cls, chain: list[bytes]) -> Roster:
        """The roster of the mesh a (verified) chain belongs to, holding that chain."""
        first = open_cert(chain[0])
        roster = cls(mesh=mesh_id_for(first.root_key), root=first.issuer)
        roster.add_chain(chain)
        return roster

    def _revoked_on(self, certs: list[Certificate]) -> str | None:
        return next((c.member for c in certs if c.member in self.revocations), None)

    def add_chain(self, chain: list[bytes]) -> Certificate:
        """Verify and keep a member's chain; its last certificate. INVALID_CREDENTIAL, WRONG_MESH, REVOKED."""
        certs = verify_chain(chain, self.mesh)
        if certs[0].issuer != self.root:
            raise AdmissionError("credential rooted at another founder", code="WRONG_MESH")
        if (gone := self._revoked_on(certs)) is not None:
            raise AdmissionError(f"credential of {certs[-1].member} runs through revoked {gone}", code="REVOKED")
        for depth in range(1, len(certs) + 1):  # the member, and every member that admitted it on the way
            member = certs[depth - 1].member
            known = self.certs.get(member)
            if known is None or depth < len(known):  # the shortest valid chain is kept
                self.chains[member], self.certs[member] = list(chain[:depth]), certs[:depth]
        return certs[-1]

    def admit(self, chain: list[bytes], peer_id: str) -> Certificate:
        """Admit the peer libp2p authenticated as ``peer_id`` on the strength of ``chain``: the chain must be
        valid and end with that peer (NOT_BOUND for a chain copied from someone else)."""
        certs = verify_chain(chain, self.mesh)
        if certs[-1].member != peer_id:
            raise AdmissionError(f"credential of {certs[-1].member} presented by {peer_id}", code="NOT_BOUND")
        return self.add_chain(chain)

    def is_member(self, node_id: str) -> bool:
        certs = self.certs.get(node_id)
        return certs is not None and self._revoked_on(certs) is None

    def revoke(self, data: bytes) -> Revocation | None:
        """Apply a sealed revocation: by a member of this mesh, of anyone but the founder. None when it was
        known already. REVOKE_ROOT, NOT_A_MEMBER (its signer), WRONG_MESH, TOO_MANY_REVOCATIONS."""
        rev = open_revocation(data)
        if rev.mesh != self.mesh:
            raise AdmissionError(f"revocation for mesh {rev.mesh}, not {self.mesh}", code="WRONG_MESH")
        if rev.revoked in self.revocations:
            return None
        if rev.revoked == self.root:
            raise AdmissionError("the founder of a mesh cannot be revoked", code="REVOKE_ROOT")
        if not self.is_member(rev.by):
            raise AdmissionError(f"revocation by {rev.by}, who is no member", code="NOT_A_MEMBER")
        if len(self.revocations) >= MAX_REVOCATIONS:
            raise AdmissionError("this mesh has revoked as many peers as a peer keeps", code="TOO_MANY_REVOCATIONS")
        self.revocations[rev.revoked] = data
        return rev

    def revoke_known(self, data: bytes) -> Revocation:
        """Apply a revocation this peer accepted before (read back from its own data dir): its signature and
        mesh are checked again, its signer's membership at the time is not (it may be gone since)."""
        rev = open_revocation(data)
        if rev.mesh != self.mesh or rev.revoked == self.root:
            raise AdmissionError("a saved revocation of another mesh, or of the founder", code="INVALID_CREDENTIAL")
        self.revocations[rev.revoked] = data
        return rev

    def members(self) -> list[MemberView]:
        """Current members, the founder first, then by admission time."""
        out = [MemberView(m, certs[-1].issuer, certs[-1].issued_at, len(certs) - 1)
               for m, certs in self.certs.items() if self._revoked_on(certs) is None]
        return sorted(out, key=lambda v: (v.depth > 0, v.admitted_at, v.node_id))


def found(identity: Identity, now: float) -> list[bytes]:
    """A new mesh with ``identity`` as its founder: the founder's chain (its own certificate)."""
    mesh = mesh_id_for(identity.public_key)
    return [seal_cert(Certificate(mesh, identity.node_id, identity.node_id, now, "", identity.public_key), identity)]


def issue(chain: list[bytes], issuer: Identity, member: str, now: float, invite: str = "") -> list[bytes]:
    """The chain of a newly admitted ``member``: the issuer's chain and one certificate more."""
    certs = verify_chain(chain, open_cert(chain[0]).mesh)
    if certs[-1].member != issuer.node_id:
        raise ValueError("the issuer's own chain ends with the issuer")
    if len(chain) >= MAX_DEPTH:
        raise AdmissionError(f"this member is {MAX_DEPTH - 1} admissions from the founder: it cannot admit more",
                             code="CHAIN_TOO_LONG")
    return [*chain, seal_cert(Certificate(certs[0].mesh, member, issuer.node_id, now, invite), issuer)]


# ---- invites -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invite:
    mesh: str
    issuer: str
    secret: bytes
    expires: float
    addrs: tuple[str, ...] = ()

    def token(self) -> str:
        raw = cbor2.dumps({"version": VERSION, "mesh": self.mesh, "issuer": self.issuer, "secret": self.secret,
                           "expires": self.expires, "addrs": list(self.addrs)})
        return INVITE_PREFIX + base58.b58encode(raw).decode()


def parse_invite(token: str) -> Invite:
    """An invite from its one-line token (INVALID_INVITE for anything else)."""
    token = token.strip()
    if not token.startswith(INVITE_PREFIX) or len(token) > MAX_INVITE_CHARS:
        raise AdmissionError("not a meshnode invite token (it starts with meshnode-invite-)", code="INVALID_INVITE")
    try:
        raw = base58.b58decode(token[len(INVITE_PREFIX):])
        r = Reader(loads_cbor(raw, MAX_INVITE_CHARS), "invite")
        if r.integer("version") != VERSION:
            raise DecodeError("invite version is not supported")
        secret, addrs = r.blob("secret"), r.raw("addrs", [])
        if len(secret) != SECRET_BYTES or not isinstance(addrs, list) or len(addrs) > MAX_LIST or not all(
                isinstance(a, str) and len(a) <= MAX_STR for a in addrs):
            raise DecodeError("invite: bad secret or addresses")
        return Invite(_short(r, "mesh"), _short(r, "issuer"), secret, r.number("expires"), tuple(addrs))
    except (ValueError, PeerError) as exc:
        raise AdmissionError(f"the invite token is damaged: {exc}", code="INVALID_INVITE") from None


@dataclass
class InviteRecord:
    expires: float
    uses_left: int
    created: float


@dataclass
class InviteBook:
    """The invites this member issued: by the hash of their secret (the secret itself is never kept)."""

    records: dict[str, InviteRecord] = field(default_factory=dict)

    def create(self, mesh: str, issuer: str, secret: bytes, now: float, ttl: float, uses: int,
               addrs: tuple[str, ...]) -> Invite:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"an invite secret is {SECRET_BYTES} random bytes")
        if not (0 < ttl <= 30 * 86400) or not 1 <= uses <= 1000:
            raise PeerError("an invite lives 1 s to 30 days and has 1 to 1000 uses", code="INVALID_PARAMETER")
        self.expire(now)
        self.records[secret_hash(secret)] = InviteRecord(now + ttl, uses, now)
        return Invite(mesh, issuer, secret, now + ttl, addrs)

    def redeem(self, secret: bytes, now: float) -> str:
        """Count one use of the invite with this secret; its hash (the new certificate names it).
        INVITE_UNKNOWN, INVITE_EXPIRED, INVITE_USED_UP."""
        key = secret_hash(secret)
        record = self.records.get(key)
        if record is None:
            raise AdmissionError("this member issued no such invite", code="INVITE_UNKNOWN")
        if now >= record.expires:
            raise AdmissionError("the invite has expired: ask a member for a new one (meshnode invite)",
                                 code="INVITE_EXPIRED")
        if record.uses_left <= 0:
            raise AdmissionError("the invite has been used as often as it allows: ask a member for a new one "
                                 "(meshnode invite)", code="INVITE_USED_UP")
        record.uses_left -= 1
        return key

    def expire(self, now: float) -> None:
        """Forget invites that expired a day ago or more (a late redeemer still hears INVITE_EXPIRED)."""
        for key in [k for k, r in self.records.items() if now >= r.expires + 86400]:
            del self.records[key]


def _short(r: Reader, key: str, default: str | None = None) -> str:
    v = r.text(key) if default is None else r.text(key, default)
    if len(v) > MAX_STR:
        raise DecodeError(f"{key}: longer than {MAX_STR} characters")
    return v
