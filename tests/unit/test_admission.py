"""The closed mesh's admission core, deterministically and without sockets: certificate chains bound to a
peer id, invites with expiry and uses, revocations that take the revoked peer's admissions with them — over a
tree of many simulated members — and a decoder that refuses every malformed, oversize or truncated input
with a code."""

from __future__ import annotations

import itertools
import random

import cbor2
import pytest

from mesh import admission as adm
from mesh.errors import MeshError, PeerError
from mesh.identity import Identity

NOW = 1_800_000_000.0


def ident(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(4, "big") * 8)


def code(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(exc.value, MeshError)
    return exc.value.code


@pytest.fixture
def mesh() -> tuple[Identity, list[bytes], adm.Roster]:
    founder = ident(1)
    chain = adm.found(founder, NOW)
    return founder, chain, adm.Roster.of(chain)


def test_a_founded_mesh_admits_a_member_only_for_its_own_peer_id(mesh) -> None:
    founder, chain, roster = mesh
    assert roster.mesh == adm.mesh_id_for(founder.public_key) and roster.root == founder.node_id
    assert roster.is_member(founder.node_id)
    bob = ident(2)
    bob_chain = adm.issue(chain, founder, bob.node_id, NOW + 1, invite="h")
    assert roster.admit(bob_chain, bob.node_id).member == bob.node_id and roster.is_member(bob.node_id)
    # a stranger presenting bob's credential: libp2p authenticated the stranger's own peer id
    stranger = ident(3)
    with pytest.raises(PeerError) as err:
        roster.admit(bob_chain, stranger.node_id)
    assert code(err) == "NOT_BOUND" and not roster.is_member(stranger.node_id)
    # the stranger's own mesh: another founder
    own = adm.found(stranger, NOW)
    with pytest.raises(PeerError) as err:
        roster.admit(own, stranger.node_id)
    assert code(err) == "WRONG_MESH"
    with pytest.raises(ValueError):  # our own API refuses to seal in another's name
        adm.seal_cert(adm.Certificate(roster.mesh, stranger.node_id, founder.node_id, NOW), stranger)
    self_signed = adm.seal_cert(adm.Certificate(roster.mesh, stranger.node_id, stranger.node_id, NOW), stranger)
    with pytest.raises(PeerError) as err:
        roster.admit([chain[0], self_signed], stranger.node_id)
    assert code(err) == "INVALID_CREDENTIAL"  # it does not continue the chain at the founder
    members = roster.members()
    assert [m.node_id for m in members] == [founder.node_id, bob.node_id]
    assert (members[1].admitted_by, members[1].admitted_at, members[1].depth) == (founder.node_id, NOW + 1, 1)


def test_a_signature_that_does_not_match_its_issuer_is_refused(mesh) -> None:
    founder, chain, roster = mesh
    bob, mallory = ident(2), ident(9)
    # mallory signs a certificate naming the founder as issuer: the envelope's key gives it away
    import mesh.wire as wire

    payload = adm.encode_cert(adm.Certificate(roster.mesh, mallory.node_id, founder.node_id, NOW))
    fake = wire.seal(adm.CERT, payload, mallory)
    with pytest.raises(PeerError) as err:
        roster.admit([chain[0], fake], mallory.node_id)
    assert code(err) == "CREDENTIAL_SIGNER_MISMATCH"
    good = adm.issue(chain, founder, bob.node_id, NOW)
    flipped = bytearray(good[1])
    flipped[-5] ^= 0x01  # inside the signature
    with pytest.raises(PeerError) as err:
        roster.admit([good[0], bytes(flipped)], bob.node_id)
    assert code(err) in ("BAD_SIGNATURE", "MALFORMED_MESSAGE")


def test_invites_expire_and_count_their_uses(mesh) -> None:
    founder, _, roster = mesh
    book = adm.InviteBook()
    invite = book.create(roster.mesh, founder.node_id, b"s" * 16, NOW, ttl=60, uses=2, addrs=("/ip4/127.0.0.1/tcp/1",))
    parsed = adm.parse_invite(invite.token())
    assert parsed == invite and "\n" not in invite.token() and invite.token().startswith("meshnode-invite-")
    assert b"s" * 16 not in cbor2.dumps({k: (r.expires, r.uses_left) for k, r in book.records.items()})
    assert book.redeem(parsed.secret, NOW + 1) == adm.secret_hash(b"s" * 16)
    book.redeem(parsed.secret, NOW + 2)
    with pytest.raises(PeerError) as err:
        book.redeem(parsed.secret, NOW + 3)
    assert code(err) == "INVITE_USED_UP"
    once = book.create(roster.mesh, founder.node_id, b"t" * 16, NOW, ttl=10, uses=5, addrs=())
    with pytest.raises(PeerError) as err:
        book.redeem(once.secret, NOW + 10)
    assert code(err) == "INVITE_EXPIRED"
    with pytest.raises(PeerError) as err:
        book.redeem(b"u" * 16, NOW)
    assert code(err) == "INVITE_UNKNOWN"
    for ttl, uses in ((0, 1), (60, 0), (31 * 86400, 1)):
        with pytest.raises(PeerError):
            book.create(roster.mesh, founder.node_id, b"v" * 16, NOW, ttl=ttl, uses=uses, addrs=())
    book.expire(NOW + 86400 + 11)  # a day after expiry the record is forgotten
    assert adm.secret_hash(b"t" * 16) not in book.records


def test_revoking_a_member_takes_its_admissions_with_it_over_a_tree_of_peers() -> None:
    rng = random.Random(7)
    founder = ident(1)
    chains = {founder.node_id: adm.found(founder, NOW)}
    idents = {founder.node_id: founder}
    parent: dict[str, str] = {}
    for i in range(2, 62):  # 60 members, each admitted by a random earlier one, chains up to MAX_DEPTH
        who = ident(i)
        eligible = [n for n in chains if len(chains[n]) < adm.MAX_DEPTH]
        by = rng.choice(eligible)
        chains[who.node_id] = adm.issue(chains[by], idents[by], who.node_id, NOW + i)
        idents[who.node_id], parent[who.node_id] = who, by
    roster = adm.Roster.of(chains[founder.node_id])
    for node, chain in chains.items():
        roster.admit(chain, node)
    revoked: set[str] = set()
    members = [n for n in chains if n != founder.node_id]
    for _ in range(8):
        victim = rng.choice(members)
        by = rng.choice([n for n in chains if roster.is_member(n)])
        rev = adm.seal_revocation(adm.Revocation(roster.mesh, victim, by, NOW + 100), idents[by])
        assert roster.revoke(rev) is not None or victim in revoked
        revoked.add(victim)
        assert roster.revoke(rev) is None  # the same revocation again changes nothing

        def alive(n: str) -> bool:
            while n in parent:
                if n in revoked:
                    return False
                n = parent[n]
            return True

        assert {n for n in chains if roster.is_member(n)} == {n for n in chains if alive(n)}
        assert {m.node_id for m in roster.members()} == {n for n in chains if alive(n)}
    gone = next(iter(revoked))
    with pytest.raises(PeerError) as err:  # a revoked peer cannot come back with its old credential
        roster.admit(chains[gone], gone)
    assert code(err) == "REVOKED"


def test_revocations_the_roster_refuses(mesh) -> None:
    founder, chain, roster = mesh
    bob, stranger = ident(2), ident(3)
    roster.admit(adm.issue(chain, founder, bob.node_id, NOW), bob.node_id)
    cases = {
        "REVOKE_ROOT": adm.seal_revocation(adm.Revocation(roster.mesh, founder.node_id, bob.node_id, NOW), bob),
        "NOT_A_MEMBER": adm.seal_revocation(adm.Revocation(roster.mesh, bob.node_id, stranger.node_id, NOW), stranger),
        "WRONG_MESH": adm.seal_revocation(adm.Revocation("mesh-other", bob.node_id, founder.node_id, NOW), founder),
    }
    for want, data in cases.items():
        with pytest.raises(PeerError) as err:
            roster.revoke(data)
        assert code(err) == want
    assert roster.is_member(bob.node_id)


def test_a_chain_too_long_cannot_grow() -> None:
    idents = [ident(i) for i in range(1, adm.MAX_DEPTH + 2)]
    chain = adm.found(idents[0], NOW)
    for a, b in itertools.pairwise(idents[:adm.MAX_DEPTH]):
        chain = adm.issue(chain, a, b.node_id, NOW)
    assert len(chain) == adm.MAX_DEPTH
    with pytest.raises(PeerError) as err:
        adm.issue(chain, idents[adm.MAX_DEPTH - 1], idents[adm.MAX_DEPTH].node_id, NOW)
    assert code(err) == "CHAIN_TOO_LONG"


def test_malformed_oversize_and_truncated_inputs_are_refused_with_codes(mesh) -> None:
    """Fuzz: every decoder of the admission protocol answers a PeerError with a code, never anything else."""
    founder, chain, roster = mesh
    rng = random.Random(3)
    bob = ident(2)
    good_chain = adm.encode_chain(adm.issue(chain, founder, bob.node_id, NOW))
    good_rev = adm.seal_revocation(adm.Revocation(roster.mesh, bob.node_id, founder.node_id, NOW), founder)
    token = adm.InviteBook().create(roster.mesh, founder.node_id, b"k" * 16, NOW, 60, 1, ()).token()
    samples = [b"", b"\x00", b"\xff" * 10, cbor2.dumps([1, 2]), cbor2.dumps({"version": 2, "chain": []}),
               cbor2.dumps({"version": 1, "chain": [b"x"] * (adm.MAX_DEPTH + 1)}), b"\xa1" * 70000,
               cbor2.dumps({"version": 1, "chain": "no"})]
    for blob in (good_chain, good_rev, chain[0]):
        samples += [blob[:n] for n in rng.sample(range(len(blob)), 20)]
        for _ in range(30):
            b = bytearray(blob)
            b[rng.randrange(len(b))] = rng.randrange(256)
            samples.append(bytes(b))
    codes = set()
    for data in samples:
        for decode in (lambda d: roster.admit(adm.decode_chain(d), bob.node_id), adm.open_cert, roster.revoke):
            try:
                decode(data)
            except PeerError as exc:
                codes.add(exc.code)
    assert codes and all(c.isupper() for c in codes)
    for bad in ("", "meshnode-invite-", "meshnode-invite-0OIl", token[:-3], token + "x", "x" * 5000,
                "meshnode-invite-" + "1" * 3000, token.replace("meshnode", "meshnodx")):
        with pytest.raises(PeerError) as err:
            adm.parse_invite(bad)
        assert code(err) == "INVALID_INVITE", bad[:40]
    # nothing a bad input did admitted anyone but bob (whose intact chain is among the samples)
    assert {m.node_id for m in roster.members()} <= {founder.node_id, bob.node_id}
    assert roster.is_member(founder.node_id) and roster.revocations == {}
