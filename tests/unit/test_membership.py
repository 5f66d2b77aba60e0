"""Membership and the peer core, fed by hand: statuses, timeouts, rejections, the lifecycle table."""

from __future__ import annotations

import pytest

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.membership import IllegalTransition, Membership, MembershipConfig, check_transition
from mesh.peer import PeerCore, PeerProfile
from mesh.wire import GpuInfo, Hardware, NodeInfo, NodeStatus, seal_node_info

S = NodeStatus
A = Identity.from_seed(b"a" * 32)
B = Identity.from_seed(b"b" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
HW = Hardware(cpu_cores=2, memory_gb=8.0, memory_free_gb=4.0)


def hb(ident: Identity, seq: int, status: S = S.READY, incarnation: int = 1, **kw: object) -> NodeInfo:
    return NodeInfo(node_id=ident.node_id, incarnation=incarnation, seq=seq, status=status,
                    version="t", hardware=kw.pop("hardware", HW), **kw)  # type: ignore[arg-type]


def test_failure_detector_degrades_then_offlines_then_recovers() -> None:
    m = Membership(A.node_id, MembershipConfig())
    m.observe(hb(B, 1), B.public_key, now=0.0)
    assert m.get(B.node_id).status == S.READY
    assert m.tick(1.0) == []  # one interval of silence is normal
    (ev,) = m.tick(1.7)  # a missed beat: suspect
    assert (ev.old, ev.new) == (S.READY, S.DEGRADED)
    (ev,) = m.tick(2.7)
    assert ev.new == S.OFFLINE
    (ev,) = m.observe(hb(B, 2), B.public_key, now=3.0)  # it resumed
    assert (ev.old, ev.new) == (S.OFFLINE, S.READY)


def test_duplicates_and_replays_change_nothing() -> None:
    m = Membership(A.node_id)
    m.observe(hb(B, 5), B.public_key, 0.0)
    assert m.observe(hb(B, 5), B.public_key, 0.5) == []
    assert m.observe(hb(B, 4, status=S.DRAINING), B.public_key, 0.6) == []
    assert m.get(B.node_id).status == S.READY and m.get(B.node_id).last_seen == 0.0
    # A restart (higher incarnation) is accepted even with a lower seq.
    (ev,) = m.observe(hb(B, 1, status=S.REGISTERING, incarnation=2), B.public_key, 1.0)
    assert ev.new == S.REGISTERING and ev.reason == "restarted"


def test_heartbeat_arrivals_count_gaps_off_pace_beats_and_missed_sequence_numbers() -> None:
    m = Membership(A.node_id, MembershipConfig())
    times = [0.0, 1.0, 2.05, 2.9, 4.5, 6.5]  # 4.5: 1.6 s late; 6.5: seq jumps by 2 (one beat lost)
    seqs = [1, 2, 3, 4, 5, 7]
    for t, seq in zip(times, seqs, strict=True):
        m.observe(hb(B, seq), B.public_key, t)
    m.observe(hb(B, 7), B.public_key, 7.0)  # a duplicate is not an arrival
    a = m.get(B.node_id).arrivals
    assert a.count == 5 and a.total == pytest.approx(6.5)
    assert (a.min, a.max) == (pytest.approx(0.85), pytest.approx(2.0))
    assert a.off_pace == 2 and a.missed == 1
    # A restart starts a new series.
    m.observe(hb(B, 1, incarnation=2), B.public_key, 8.0)
    m.observe(hb(B, 2, incarnation=2), B.public_key, 9.0)
    a = m.get(B.node_id).arrivals
    assert (a.count, a.off_pace, a.missed, a.mean) == (1, 0, 0, pytest.approx(1.0))


def test_node_id_held_by_another_key_is_a_conflict() -> None:
    m = Membership(A.node_id)
    with pytest.raises(PeerError) as err:
        m.observe(hb(B, 1), MALLORY.public_key, 0.0)
    assert err.value.code == "NODE_ID_CONFLICT"
    assert m.get(B.node_id) is None


def test_goodbye_and_draining() -> None:
    m = Membership(A.node_id)
    m.observe(hb(B, 1), B.public_key, 0.0)
    (ev,) = m.observe(hb(B, 2, status=S.DRAINING), B.public_key, 0.5)
    assert ev.new == S.DRAINING
    (ev,) = m.observe(hb(B, 3, status=S.OFFLINE), B.public_key, 0.6)
    assert ev.new == S.OFFLINE


def test_offline_members_are_forgotten() -> None:
    m = Membership(A.node_id, MembershipConfig(forget_after=10.0))
    m.observe(hb(B, 1), B.public_key, 0.0)
    m.tick(3.0)
    assert m.get(B.node_id).status == S.OFFLINE
    m.tick(12.0)
    assert m.get(B.node_id).status == S.OFFLINE
    events = m.tick(13.1)
    assert [type(e).__name__ for e in events] == ["Forgotten"] and m.get(B.node_id) is None


def test_require_gpu_policy() -> None:
    m = Membership(A.node_id, MembershipConfig(require_gpu=True))
    m.observe(hb(B, 1), B.public_key, 0.0)
    assert not m.eligible(m.get(B.node_id))
    assert any(i.startswith("no_gpu") for i in m.issues(m.get(B.node_id), 0.0))
    gpu_hw = Hardware(gpus=(GpuInfo("A100", 40.0, 0.0),), cpu_cores=2, memory_gb=8, memory_free_gb=4)
    m.observe(hb(B, 2, hardware=gpu_hw), B.public_key, 0.1)
    assert m.eligible(m.get(B.node_id))
    plain = Membership(A.node_id)  # the policy is off by default: CPU machines serve
    plain.observe(hb(B, 1), B.public_key, 0.0)
    assert plain.eligible(plain.get(B.node_id))


def test_lifecycle_table() -> None:
    check_transition(S.REGISTERING, S.READY)
    check_transition(S.READY, S.DEGRADED)
    check_transition(S.DEGRADED, S.READY)
    check_transition(S.DRAINING, S.OFFLINE)
    for bad in [(S.DRAINING, S.READY), (S.OFFLINE, S.READY), (S.READY, S.REGISTERING)]:
        with pytest.raises(IllegalTransition):
            check_transition(*bad)


def core(ident: Identity, now: float = 0.0) -> PeerCore:
    return PeerCore(ident, PeerProfile(version="t"), MembershipConfig(), now)


def test_core_rejects_and_keeps_going() -> None:
    a, b = core(A), core(B)
    data, _ = b.heartbeat(0.0, hardware=HW, compute_flops=1.0)
    forged = seal_node_info(hb(B, 99), MALLORY)  # B's id, Mallory's key and signature
    with pytest.raises(PeerError) as err:
        a.receive(forged, 0.1)
    assert err.value.code == "NODE_ID_CONFLICT"
    with pytest.raises(PeerError) as err:
        a.receive(b"\x00garbage", 0.1)
    assert err.value.code == "MALFORMED_MESSAGE"
    assert a.membership.get(B.node_id) is None
    a.receive(data, 0.2)  # the genuine heartbeat still gets in
    assert a.membership.get(B.node_id).info.seq == 1


def test_core_lifecycle_and_resource_pressure() -> None:
    a = core(A)
    a.heartbeat(0.0, hardware=HW, compute_flops=1.0)
    assert a.status == S.REGISTERING
    a.tick(2.0)
    assert a.status == S.READY and a.leadership.coordinator == A.node_id  # alone: claims term 1
    assert a.leadership.term == 1
    low = Hardware(cpu_cores=2, memory_gb=8.0, memory_free_gb=0.1)
    a.heartbeat(2.5, hardware=low, compute_flops=1.0)
    assert a.status == S.DEGRADED
    a.heartbeat(3.5, hardware=HW, compute_flops=1.0)
    assert a.status == S.READY
    a.drain(4.0)
    assert a.status == S.DRAINING and a.leadership.coordinator is None
    a.stop(5.0)
    assert a.status == S.OFFLINE
