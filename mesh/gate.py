"""The gate of a closed mesh: which connected peers are members, checked on every protocol.

When a connection to a known member comes up, each side sends its credential over ``/meshnode/admit/1`` and
checks the other's (``Roster.admit``: a valid chain that ends with the peer id libp2p authenticated); a peer
this one does not know must present its credential first (a newcomer knows its issuer, a member every member
it hears of). Until a peer is admitted, and for good once it is refused or revoked:

- its streams on every protocol but admission, joining and ping are reset (``guarded``: NOT_A_MEMBER);
- gossip it forwards, or that a non-member signed, is neither delivered nor relayed (``accepts``);
- it is disconnected when it has not been admitted within ``ADMIT_TIMEOUT`` (a stranger gets nothing).

Members learn of members they are not connected to from the members topic: every member republishes its own
chain and the revocations it knows every ``ANNOUNCE_INTERVAL`` (chains and revocations are self-certifying, so
whoever relays them). A newcomer redeems an invite over ``/meshnode/join/1`` at the member that issued it
(``redeem``), which checks the invite, issues a certificate bound to the newcomer's authenticated peer id and
saves the use. ``revoke`` seals a revocation, applies it, saves it and publishes it: every member that hears it
drops the revoked peer (and every peer admitted through it) within one announcement.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
import trio

from mesh import admission as adm
from mesh.credential import Membership
from mesh.errors import DecodeError, PeerError
from mesh.identity import Identity, node_id_for_key
from mesh.ids import NodeId
from mesh.logs import Throttle
from mesh.ports import Network
from mesh.tally import Tally
from mesh.transport import GossipMessage, Stream
from mesh.wire import Reader, loads_cbor, open_envelope

log = logging.getLogger(__name__)
ADMIT_PROTOCOL = "/meshnode/admit/1"
JOIN_PROTOCOL = "/meshnode/join/1"
MEMBERS_TOPIC = "meshnode/v1/members"
OPEN_PROTOCOLS = frozenset({ADMIT_PROTOCOL, JOIN_PROTOCOL, "/meshnode/ping/1"})
ADMIT_TIMEOUT = 5.0  # seconds a connected peer has to prove membership
ANNOUNCE_INTERVAL = 3.0
MAX_FRAME = adm.MAX_CHAIN_BYTES + 1024
MAX_ANNOUNCE = 256 * 1024


def refusal(error: PeerError) -> bytes:
    """An admission or join answer that refuses, with the code."""
    return _answer(error=error)


def _answer(chain: list[bytes] | None = None, error: PeerError | None = None) -> bytes:
    if error is not None:
        return cbor2.dumps({"version": adm.VERSION, "error": error.code, "message": str(error)[:300]})
    return adm.encode_chain(chain or [])


class Refused(adm.AdmissionError):
    """The other side refused this peer's credential or invite (its code)."""


def read_answer(data: bytes) -> list[bytes]:
    """The chain in an admission or join answer; the refusal's code raised as ``Refused``."""
    r = Reader(loads_cbor(data, MAX_FRAME), "admission")
    code = r.raw("error", None)
    if code is not None:
        if not isinstance(code, str) or not code.isupper() or len(code) > 64:
            raise DecodeError("admission.error: expected a code")
        raise Refused(f"refused: {str(r.raw('message', ''))[:300]}", code=code)
    return adm.decode_chain(data)


class Gate:
    def __init__(self, membership: Membership, identity: Identity, network: Network, *,
                 clock: Callable[[], float], save: Callable[[], Awaitable[None]]) -> None:
        self.membership, self.identity, self.network = membership, identity, network
        self.clock, self.save = clock, save
        self.roster = membership.roster
        self.admitted: set[NodeId] = set()
        # peer -> the code it was refused with and when (trio time): a refusal holds for the connection it was
        # made on, so a stranger cut off for a replayed credential may come back and redeem an invite
        self.refused: dict[NodeId, tuple[str, float]] = {}
        self._tried: set[NodeId] = set()  # connected peers this one has sent its credential to
        self._throttle = Throttle(every=10.0)
        self.refusals = Tally()  # what this gate refused (gossip, admission, joins) by code, for GET /metrics
        self._dirty = False  # revocations heard and not saved yet
        self.wake = trio.Event()

    # ---- what other parts ask ----------------------------------------------------------------------

    def allows(self, peer: NodeId) -> bool:
        return peer == self.identity.node_id or (peer in self.admitted and self.roster.is_member(peer))

    def accepts(self, msg: GossipMessage) -> bool:
        """Gossip is taken from members only: relayed by an admitted peer, and signed by a member."""
        if not self.relayed(msg):
            return False
        try:
            signer = node_id_for_key(open_envelope(msg.data).public_key)
        except PeerError:
            return True  # malformed: the topic's own validator refuses it with its code
        return self.signed_by_member(signer)

    def relayed(self, msg: GossipMessage) -> bool:
        """Relayed here by an admitted peer (or published here)."""
        if msg.forwarder is not None and not self.allows(NodeId(msg.forwarder)):
            self._refuse_log(NodeId(msg.forwarder), "NOT_A_MEMBER", "gossip relayed by a non-member")
            return False
        return True

    def signed_by_member(self, signer: str) -> bool:
        """``signer`` (the node id of a verified envelope's key) is a member, or this peer."""
        if not self.roster.is_member(signer) and signer != self.identity.node_id:
            self._refuse_log(NodeId(signer), "NOT_A_MEMBER", "gossip signed by a non-member")
            return False
        return True

    def guarded(self, network: Network) -> Any:
        """``network`` whose ``handle`` serves members only (the shard server registers through it)."""
        gate = self

        class Guarded:
            def handle(self, protocol: str, handler: Callable[[Stream], Awaitable[None]], **kw: Any) -> None:
                network.handle(protocol, gate.guard(protocol, handler), **kw)

        return Guarded()

    def guard(self, protocol: str, handler: Callable[[Stream], Awaitable[None]]
              ) -> Callable[[Stream], Awaitable[None]]:
        if protocol in OPEN_PROTOCOLS:
            return handler

        async def only_members(stream: Stream) -> None:
            if not self.allows(stream.peer):
                raise adm.AdmissionError(f"{stream.peer} is not a member of {self.roster.mesh}", code="NOT_A_MEMBER")
            await handler(stream)

        return only_members

    def _refuse_log(self, peer: NodeId, code: str, why: str) -> None:
        self.refusals.add(code)
        held = self._throttle.allow((peer, code), self.clock())
        if held is not None:
            log.warning("%s %s: %s%s", why, peer, code, f" ({held} more held back)" if held else "",
                        extra={"event": "not_admitted", "code": code, "peer": peer})

    # ---- admission ---------------------------------------------------------------------------------

    def register(self) -> None:
        self.network.handle(ADMIT_PROTOCOL, self._serve_admit, max_concurrent=32, timeout=5.0)
        self.network.handle(JOIN_PROTOCOL, self._serve_join, max_concurrent=4, timeout=10.0)
        self.network.set_validator(MEMBERS_TOPIC, self._accept_announcement)

    def _check(self, chain: list[bytes], peer: NodeId) -> None:
        try:
            self.roster.admit(chain, peer)
        except PeerError:
            self.admitted.discard(peer)
            raise
        self.admitted.add(peer)
        self.refused.pop(peer, None)

    def _cut_off(self, peer: NodeId, code: str) -> None:
        """Refuse ``peer`` on its current connection: the loop disconnects it now."""
        self.refused[peer] = (code, trio.current_time())
        self.wake.set()

    async def _serve_admit(self, stream: Stream) -> None:
        chain = None
        try:
            chain = adm.decode_chain(await stream.receive_frame(MAX_FRAME))
            self._check(chain, stream.peer)
        except PeerError as err:
            self._refuse_log(stream.peer, err.code, "admission refused to")
            await stream.send_frame(_answer(error=err))
            if chain is not None:  # a credential refused, not a garbled frame: cut off once it has read why
                with contextlib.suppress(PeerError):
                    await stream.read_some(1, timeout=2.0)  # its close (bounded: it may not)
                self._cut_off(stream.peer, err.code)
            return
        await stream.send_frame(_answer(self.membership.chain))

    async def admit(self, peer: NodeId) -> None:
        """Prove this peer's membership to ``peer`` and check its proof (PeerError with the code if refused)."""
        async with self.network.open_stream(peer, ADMIT_PROTOCOL, timeout=5.0) as stream:
            await stream.send_frame(adm.encode_chain(self.membership.chain))
            self._check(read_answer(await stream.receive_frame(MAX_FRAME)), peer)

    async def _admit_quietly(self, peer: NodeId) -> None:
        try:
            await self.admit(peer)
        except PeerError as err:
            if peer not in self.refused:
                self._cut_off(peer, err.code)
            if isinstance(err, Refused) and err.code == "REVOKED":  # a member told us: we were revoked
                if self._throttle.allow(("self", "REVOKED"), self.clock()) is not None:
                    log.error("member %s refuses this peer: it was revoked from %s (%s)", peer, self.roster.mesh,
                              err, extra={"event": "revoked_self", "code": "REVOKED", "peer": peer})
                return
            self._refuse_log(peer, err.code, "admission failed with")

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Admit new connections, drop those that do not prove membership, announce, hear announcements."""
        self.register()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announce)
            nursery.start_soon(self._hear)
            task_status.started()
            while True:
                if self._dirty:  # members and revocations learned: kept across a restart
                    self._dirty = False
                    await self.save()
                connected = self.network.connected_peers()
                self._tried &= connected
                for peer in set(self.refused) - connected:  # bounded by the connections, not by every visitor
                    del self.refused[peer]
                for peer in connected:
                    age = self.network.connection_age(peer)
                    if self.allows(peer) or age is None:
                        continue
                    code = self._refusal(peer, age)
                    if code is not None or age >= ADMIT_TIMEOUT:
                        self._refuse_log(peer, code or "NOT_A_MEMBER", "disconnecting")
                        await self.network.disconnect(peer)
                        self.admitted.discard(peer)
                    elif peer not in self._tried and self.roster.is_member(peer):
                        # a member we know (now): prove ourselves (it does the same); anyone else must present
                        # its credential itself, so a stranger's connection costs nothing until it closes
                        self._tried.add(peer)
                        nursery.start_soon(self._admit_quietly, peer)
                with trio.move_on_after(0.25):
                    await self.wake.wait()
                    self.wake = trio.Event()

    def _refusal(self, peer: NodeId, age: float) -> str | None:
        """The code ``peer`` was refused with on its current connection (``age`` seconds old), if it was."""
        code, at = self.refused.get(peer, (None, 0.0))
        if code is not None and at < trio.current_time() - age:  # made on an earlier connection
            del self.refused[peer]
            return None
        return code

    # ---- announcements -------------------------------------------------------------------------------

    def _announcement(self) -> bytes:
        return cbor2.dumps({"version": adm.VERSION, "chain": self.membership.chain,
                            "revocations": list(self.roster.revocations.values())[-64:]})

    async def _announce(self) -> None:
        while True:
            with trio.move_on_after(ANNOUNCE_INTERVAL):
                await self.network.publish(MEMBERS_TOPIC, self._announcement())
            await trio.sleep(ANNOUNCE_INTERVAL)

    def _accept_announcement(self, msg: GossipMessage) -> bool:
        """Chains and revocations are self-certifying: learned from whoever sends them (a restarted member
        that forgot a member hears of it, and of its own revocation, from that member itself), relayed only
        when an admitted peer sent them."""
        relay = msg.forwarder is None or self.allows(NodeId(msg.forwarder))
        try:
            r = Reader(loads_cbor(msg.data, MAX_ANNOUNCE), "announcement")
            chain, revocations = r.raw("chain"), r.raw("revocations", [])
            if not isinstance(revocations, list) or len(revocations) > 64:
                raise DecodeError("announcement.revocations: at most 64")
            changed = False
            for data in revocations:
                if not isinstance(data, bytes):
                    raise DecodeError("announcement.revocations: expected byte strings")
                changed |= self._apply_revocation(data)
            if not isinstance(chain, list) or not all(isinstance(c, bytes) for c in chain):
                raise DecodeError("announcement.chain: expected a list of certificates")
            known = len(self.roster.certs)
            self.roster.add_chain(chain)
            if len(self.roster.certs) > known:  # a member this peer did not know: kept across a restart
                self._dirty = True
            if changed:
                self.wake.set()
        except PeerError as err:
            self._refuse_log(msg.sender, err.code, "announcement refused from")
            return False
        return relay

    async def _hear(self) -> None:
        async with self.network.subscribe(MEMBERS_TOPIC) as messages:
            async for _ in messages:  # the validator did the work (and ``run`` saves what it learned)
                pass

    def _apply_revocation(self, data: bytes) -> bool:
        try:
            rev = self.roster.revoke(data)
        except PeerError as err:
            if err.code == "NOT_A_MEMBER":  # its signer was revoked first, or is not known yet
                return False
            raise
        if rev is None:
            return False
        self._revoked(rev)
        return True

    def _revoked(self, rev: adm.Revocation) -> None:
        """What follows a revocation the roster took, heard or made here: logged, the admitted peers, a save."""
        if rev.revoked == self.identity.node_id:
            log.error("this peer was revoked from %s by %s: its members refuse it", self.roster.mesh, rev.by,
                      extra={"event": "revoked_self", "code": "REVOKED", "peer": rev.by})
        else:
            log.warning("%s revoked by %s", rev.revoked, rev.by, extra={"event": "revoked", "peer": rev.revoked})
        self.admitted = {p for p in self.admitted if self.roster.is_member(p)}
        self._dirty = True

    async def revoke(self, node_id: str) -> adm.Revocation:
        """Revoke a member (any member may): sealed, applied here, saved and published. Revoking a peer that
        is revoked already answers the revocation there is (idempotent)."""
        if node_id in self.roster.revocations:
            return adm.open_revocation(self.roster.revocations[node_id])
        if not self.roster.is_member(node_id):
            raise adm.AdmissionError(f"{node_id} is not a member of {self.roster.mesh}", code="NOT_A_MEMBER")
        data = adm.seal_revocation(adm.Revocation(self.roster.mesh, node_id, self.identity.node_id, self.clock()),
                                   self.identity)
        rev = self.roster.revoke(data)
        assert rev is not None
        self._revoked(rev)
        self._dirty = False  # saved now, before the answer
        await self.save()
        self.wake.set()
        with trio.move_on_after(ANNOUNCE_INTERVAL):
            await self.network.publish(MEMBERS_TOPIC, self._announcement())
        return rev

    # ---- invites -------------------------------------------------------------------------------------

    async def invite(self, ttl: float, uses: int, addrs: tuple[str, ...]) -> adm.Invite:
        if not self.roster.is_member(self.identity.node_id):
            raise adm.AdmissionError("this peer is no longer a member: it cannot invite", code="REVOKED")
        invite = self.membership.invites.create(self.roster.mesh, self.identity.node_id, os.urandom(adm.SECRET_BYTES),
                                                self.clock(), ttl, uses, addrs)
        await self.save()
        return invite

    async def _serve_join(self, stream: Stream) -> None:
        try:
            r = Reader(loads_cbor(await stream.receive_frame(MAX_FRAME), MAX_FRAME), "join")
            if r.integer("version") != adm.VERSION:
                raise DecodeError("join version is not supported", code="UNSUPPORTED_VERSION")
            secret = r.blob("secret")
            if not self.roster.is_member(self.identity.node_id):
                raise adm.AdmissionError("the member that issued this invite was revoked", code="REVOKED")
            if stream.peer in self.roster.revocations:
                raise adm.AdmissionError(f"{stream.peer} was revoked", code="REVOKED")
            used = self.membership.invites.redeem(secret, self.clock())
            chain = adm.issue(self.membership.chain, self.identity, stream.peer, self.clock(), used)
            self._check(chain, stream.peer)
            await self.save()
        except PeerError as err:
            self._refuse_log(stream.peer, err.code, "join refused to")
            await stream.send_frame(_answer(error=err))
            return
        log.info("admitted %s to %s", stream.peer, self.roster.mesh,
                 extra={"event": "admitted", "peer": stream.peer, "mesh": self.roster.mesh})
        await stream.send_frame(_answer(chain))


async def redeem(network: Network, invite: adm.Invite) -> list[bytes]:
    """Redeem ``invite`` at its issuer (dialing one of its addresses): this peer's chain, bound to its peer
    id. AdmissionError with the issuer's code (INVITE_EXPIRED, INVITE_USED_UP, ...) when refused."""
    issuer = NodeId(invite.issuer)
    for addr in invite.addrs:
        try:
            await network.connect(addr)
            break
        except PeerError:
            continue
    async with network.open_stream(issuer, JOIN_PROTOCOL, timeout=10.0) as stream:
        await stream.send_frame(cbor2.dumps({"version": adm.VERSION, "secret": invite.secret}))
        chain = read_answer(await stream.receive_frame(MAX_FRAME))
    if adm.verify_chain(chain, invite.mesh)[-1].member != network.node_id:
        raise adm.AdmissionError("the issuer answered a credential for another peer", code="NOT_BOUND")
    return chain


async def become_member(network: Network, token: str) -> list[bytes]:
    """Join with the invite ``token`` and answer admission with the credential it gave, for a member that runs
    no ``Gate`` of its own (a tool, or a test's hostile host with a valid membership)."""
    chain = await redeem(network, adm.parse_invite(token))

    async def answer(stream: Stream) -> None:
        await stream.receive_frame(MAX_FRAME)
        await stream.send_frame(adm.encode_chain(chain))

    network.handle(ADMIT_PROTOCOL, answer, max_concurrent=4, timeout=5.0)
    return chain
