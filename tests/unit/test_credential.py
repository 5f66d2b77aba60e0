"""A peer's membership in its data dir: saved atomically with mode 0600 and read back whole (its chain, the
members and revocations it knew, its invites without their secrets); a damaged, foreign or readable file is
refused with a code, and a data dir that belongs to no mesh says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh import admission as adm
from mesh import credential
from mesh.errors import MeshError
from mesh.identity import Identity

NOW = 1_800_000_000.0


def ident(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(4, "big") * 8)


def test_membership_survives_a_restart_with_its_members_revocations_and_invites(tmp_path: Path) -> None:
    founder, bob, carol = ident(1), ident(2), ident(3)
    assert credential.load(tmp_path / "a", founder) is None  # no mesh yet
    a = credential.found(tmp_path / "a", founder, NOW)
    path = tmp_path / "a" / credential.MEMBERSHIP_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    invite = a.invites.create(a.mesh, founder.node_id, b"q" * 16, NOW, 600, 2, ("/ip4/127.0.0.1/tcp/9",))
    bob_chain = adm.issue(a.chain, founder, bob.node_id, NOW + 1, a.invites.redeem(invite.secret, NOW + 1))
    a.roster.admit(bob_chain, bob.node_id)
    carol_chain = adm.issue(bob_chain, bob, carol.node_id, NOW + 2)
    a.roster.admit(carol_chain, carol.node_id)
    a.roster.revoke(adm.seal_revocation(adm.Revocation(a.mesh, carol.node_id, bob.node_id, NOW + 3), bob))
    credential.save(tmp_path / "a", a)
    assert b"q" * 16 not in path.read_bytes()  # only the secret's hash is kept

    again = credential.load(tmp_path / "a", founder)
    assert again is not None and again.mesh == a.mesh and again.chain == a.chain
    assert again.roster.is_member(bob.node_id) and not again.roster.is_member(carol.node_id)
    assert again.invites.records[adm.secret_hash(b"q" * 16)].uses_left == 1

    b = credential.joined(tmp_path / "b", bob_chain, bob)
    assert credential.load(tmp_path / "b", bob).chain == b.chain == bob_chain
    with pytest.raises(MeshError) as err:  # the chain must be this peer's own
        credential.joined(tmp_path / "c", bob_chain, carol)
    assert err.value.code == "NOT_BOUND"


def test_a_damaged_foreign_or_readable_membership_file_is_refused(tmp_path: Path) -> None:
    founder, other = ident(1), ident(2)
    credential.found(tmp_path, founder, NOW)
    path = tmp_path / credential.MEMBERSHIP_FILE
    with pytest.raises(MeshError) as err:  # another identity's data dir
        credential.load(tmp_path, other)
    assert err.value.code == "INVALID_MEMBERSHIP"
    os.chmod(path, 0o644)
    with pytest.raises(MeshError) as err:
        credential.load(tmp_path, founder)
    assert err.value.code == "INSECURE_PERMISSIONS"
    os.chmod(path, 0o600)
    good = path.read_bytes()
    for damaged in (good[:-7], good[: len(good) // 2], b"\xff" * 40, b""):
        path.write_bytes(damaged)
        os.chmod(path, 0o600)
        with pytest.raises(MeshError) as err:
            credential.load(tmp_path, founder)
        assert err.value.code == "INVALID_MEMBERSHIP", damaged[:10]
