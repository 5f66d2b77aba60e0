"""A closed mesh of real `meshnode start` processes on 127.0.0.1: A founds it, B joins with an invite. A
stranger of its own mesh and an open one, both bootstrapping to A with a compute claim that would win any
election, are never ready in A's or B's view and never coordinator, also after the coordinator is killed; a
hostile libp2p host with a valid identity replays B's credential and a used invite, and cannot open a manifest
stream, replays B's captured heartbeat, and sends malformed, truncated and oversize admission frames (each
refused with its code; A keeps serving); expired and used-up invites are refused; a revoked member is refused
within 10 s and its restart with its old membership fails clearly."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import cbor2
import pytest
import trio

from mesh import admission as adm
from mesh import credential
from mesh.app.cli import main as cli
from mesh.app.localmesh import LocalMesh, PeerProcess, wait_for
from mesh.errors import MeshError, PeerError
from mesh.gate import ADMIT_PROTOCOL, ADMIT_TIMEOUT, become_member, read_answer, redeem
from mesh.identity import Identity
from mesh.keyfile import load_or_create
from mesh.transport import Transport
from mesh.wire import NODES_TOPIC
from storage.transfer import MANIFEST_PROTOCOL

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
ARGS = ("--benchmark-seconds", "0.05", "--compute-gflops", "10")
STRONG = ("--compute-gflops", "10000")  # a claim that wins every election it takes part in


def ready(peer: PeerProcess) -> set[str]:
    return {n["node_id"] for n in peer.get("/api/nodes")["nodes"] if n["status"] == "ready"}


def exits_with(peer: PeerProcess, code: str, timeout: float = 30.0) -> None:
    """The peer's process ends (non-zero) and its output names ``code``."""
    peer.proc.wait(timeout=timeout)
    assert peer.proc.returncode != 0, peer.name
    assert code in peer.log_path.read_text(errors="replace"), (code, peer.log_path.read_text()[-2000:])


async def captured_heartbeat(a: PeerProcess, b: PeerProcess, token: str) -> bytes:
    """One of B's signed heartbeats as a member hears it (the capture a replay starts from)."""
    async with Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as m:
        await become_member(m, token)
        async with m.subscribe(NODES_TOPIC) as messages:
            with trio.fail_after(15):
                async for msg in messages:
                    if msg.sender == b.node_id:
                        return msg.data
    raise AssertionError("no heartbeat of b heard")


async def fresh(t: Transport, a: PeerProcess) -> str:
    """A new connection to A: a refusal, and A's deadline to prove membership, hold for one connection."""
    await t.disconnect(a.node_id)
    with trio.fail_after(5):
        while a.node_id in t.connected_peers():
            await trio.sleep(0.05)
    return await t.connect(a.addrs[0])


async def hostile(a: PeerProcess, b_chain: list[bytes], used: adm.Invite, heartbeat: bytes) -> dict[str, str]:
    """A libp2p host with a valid identity of its own: what A answers each attack with."""
    codes = {}
    async with Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as t:
        codes["self"] = t.node_id
        peer = await t.connect(a.addrs[0])
        async with t.subscribe(NODES_TOPIC):  # B's heartbeat, replayed by the stranger
            await trio.sleep(1.0)
            await t.publish(NODES_TOPIC, heartbeat)
            await trio.sleep(0.5)
        # fuzz: malformed, oversize and truncated admission frames, each answered with a code
        fuzz = [b"\x00 garbage \xff", adm.encode_chain(b_chain)[:-9], b"\xa1" * 9000, cbor2.dumps({"version": 1})]
        for i, frame in enumerate(fuzz):
            await fresh(t, a)
            try:
                async with t.open_stream(peer, ADMIT_PROTOCOL) as stream:
                    await stream.send_frame(frame)
                    read_answer(await stream.receive_frame(64 * 1024))
                codes[f"fuzz{i}"] = "ADMITTED"
            except PeerError as err:
                codes[f"fuzz{i}"] = err.code
        await fresh(t, a)
        async with t.open_stream(peer, ADMIT_PROTOCOL) as stream:  # B's credential, replayed
            await stream.send_frame(adm.encode_chain(b_chain))
            try:
                read_answer(await stream.receive_frame(64 * 1024))
            except PeerError as err:
                codes["credential"] = err.code
        with trio.move_on_after(ADMIT_TIMEOUT / 2):  # refused: A cuts it off (long before the deadline)
            while a.node_id in t.connected_peers():
                await trio.sleep(0.05)
        codes["cut_off"] = str(a.node_id not in t.connected_peers())
        await fresh(t, a)
        try:  # a captured invite, used already (a new connection may try one, as a newcomer does)
            await redeem(t, used)
        except PeerError as err:
            codes["invite"] = err.code
        await fresh(t, a)
        try:
            async with t.open_stream(peer, MANIFEST_PROTOCOL) as stream:
                await stream.send_frame(b"\xa1\x65model\x64tiny")
                await stream.receive_frame(1024)
            codes["manifest"] = "ANSWERED"
        except PeerError as err:
            codes["manifest"] = err.code
    return codes


def test_strangers_never_take_part_and_a_revoked_member_is_refused(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, CONFIG, extra_args=ARGS) as mesh:
        a = mesh.start_peer("a")  # a data dir of no mesh, no bootstrap: founds one
        membership = (tmp_path / "a" / credential.MEMBERSHIP_FILE)
        assert membership.stat().st_mode & 0o777 == 0o600
        founded = credential.load(tmp_path / "a", load_or_create(tmp_path / "a"))
        assert founded is not None and f"mesh {founded.mesh}" in a.log_path.read_text()
        assert "meshnode invite" in a.log_path.read_text()
        token = mesh.invite(a, uses=2)
        b = mesh.start_peer("b", a.addrs[:1], args=("--join", token))  # joins with the invite
        wait_for(lambda: ready(a) == ready(b) == {a.node_id, b.node_id}, 20, what="a and b ready")

        # strangers, bootstrapping to a: one of its own mesh, one open
        s = mesh.start_peer("s")  # founds its own mesh ...
        s.signal(signal.SIGINT)
        s.proc.wait(timeout=10)
        s = mesh.start_peer("s", a.addrs[:1], args=STRONG)  # ... and comes back bootstrapping to a
        o = mesh.start_peer("o", a.addrs[:1], args=("--open", *STRONG))
        assert "open mesh" in o.log_path.read_text()
        time.sleep(6)
        for peer in (a, b):
            assert ready(peer) == {a.node_id, b.node_id}, peer.name
            assert peer.get("/api/coordinator")["node_id"] in {a.node_id, b.node_id}
        assert a.node_id not in ready(s) and a.node_id not in ready(o)
        members = a.get("/api/members")
        assert {m["node_id"] for m in members["members"]} == {a.node_id, b.node_id}
        assert members["founder"] == a.node_id

        # invites: used up (the second use of a 1-use invite) and expired
        once = mesh.invite(a, uses=1)
        c = mesh.start_peer("c", a.addrs[:1], args=("--join", once))
        late = mesh.launch("late", [], args=("--join", once))
        exits_with(late, "INVITE_USED_UP")
        short = mesh.invite(a, ttl=1)
        time.sleep(1.5)
        expired = mesh.launch("expired", [], args=("--join", short))
        exits_with(expired, "INVITE_EXPIRED")
        lost = mesh.launch("lost", [], args=("--bootstrap", a.addrs[0]))  # a multiaddr is no invite
        exits_with(lost, "NOT_A_MEMBER")
        assert "meshnode invite" in lost.log_path.read_text()

        # a hostile host with its own valid identity
        b_chain = credential.load(tmp_path / "b", load_or_create(tmp_path / "b")).chain
        heartbeat = trio.run(captured_heartbeat, a, b, mesh.invite(a))
        codes = trio.run(hostile, a, b_chain, adm.parse_invite(once), heartbeat)
        assert codes["credential"] == "NOT_BOUND" and codes["cut_off"] == "True", codes
        assert codes["invite"] == "INVITE_USED_UP", codes
        assert all(codes[f"fuzz{i}"] not in ("ADMITTED", "") for i in range(4)), codes
        assert {codes["fuzz0"], codes["fuzz1"], codes["fuzz3"]} <= {"MALFORMED_MESSAGE", "STREAM_CLOSED"}, codes
        replayed = [r for r in a.log_records() if r.get("event") == "not_admitted" and r.get("peer") == codes["self"]]
        assert any("gossip relayed by a non-member" in r["msg"] for r in replayed), replayed
        assert a.get("/api/health")["status"] == "ok"  # and it keeps serving
        assert codes["manifest"] in ("STREAM_CLOSED", "PEER_UNREACHABLE"), codes  # reset, or cut off: no answer

        # the coordinator killed: the strangers' claims still count for nothing
        wait_for(lambda: ready(a) >= {a.node_id, b.node_id, c.node_id}, 20, what="c ready")
        lead = a.get("/api/coordinator")["node_id"]
        victim = next(p for p in (a, b, c) if p.node_id == lead)
        survivors = [p for p in (a, b, c) if p is not victim]
        victim.proc.kill()
        victim.proc.wait()
        wait_for(lambda: all(p.get("/api/coordinator")["node_id"] in {q.node_id for q in survivors}
                             for p in survivors), 20, what="a member to coordinate")

        # revoke: any member, gossiped; within 10 s every member refuses the revoked one
        x, y = survivors
        before = (y.data_dir / credential.MEMBERSHIP_FILE).read_bytes()  # y's membership, as it was
        t0 = time.monotonic()
        assert cli(["revoke", y.node_id, "--api", x.api.removeprefix("http://"), "--data-dir", str(x.data_dir)]) == 0
        wait_for(lambda: y.node_id in x.get("/api/members")["revoked"] and y.node_id not in ready(x), 10,
                 what="the revoked member refused")
        print(f"revocation effective in {time.monotonic() - t0:.1f}s")
        y.proc.kill()
        y.proc.wait()
        # as a peer that was away when it was revoked: its saved membership knows nothing of it
        (y.data_dir / credential.MEMBERSHIP_FILE).write_bytes(before)
        again = mesh.launch(y.name, x.addrs[:1])
        wait_for(lambda: any(r.get("event") == "revoked_self" and r.get("code") == "REVOKED"
                             for r in again.log_records()), 20, what="the members to tell it it was revoked")
        def kept() -> bool:  # its saved membership now says it was revoked
            try:
                credential.load(y.data_dir, load_or_create(y.data_dir))
            except MeshError as err:
                return "REVOKED" in str(err)
            return False

        wait_for(kept, 10, what="it to keep what it heard")
        again.proc.kill()
        again.proc.wait()
        restarted = mesh.launch(y.name, x.addrs[:1])  # it kept what it heard: now it fails at once
        exits_with(restarted, "REVOKED", timeout=20)
