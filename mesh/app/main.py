"""``meshnode start``: one peer on libp2p, built from its data dir (identity, store), the machine
(hardware, a FLOP/s measurement) and its config, with the HTTP API on."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import time

import psutil
import trio

from mesh import admission as adm
from mesh import credential, hardware
from mesh.app.api import serve_api
from mesh.app.client import API_TOKEN_FILE, read_token_file
from mesh.app.node import NODE_FILE, VERSION, Node
from mesh.config import Config, ConfigError, is_loopback_bind
from mesh.credential import Membership
from mesh.fsutil import atomic_write
from mesh.gate import redeem
from mesh.identity import Identity
from mesh.keyfile import load_or_create
from mesh.peer import PeerCore, PeerProfile
from mesh.transport import Transport, is_loopback_addr
from storage.registry import LockTimeouts
from storage.store import Store

log = logging.getLogger(__name__)


def layer_memory(config: Config) -> int:
    """Bytes this peer offers for model layers: the configured cap, else the memory available now less
    the free-memory floor (taken once at start, so loading layers does not shrink the offer)."""
    if config.node.max_layer_memory_mb > 0:
        return int(config.node.max_layer_memory_mb * 2**20)
    return max(0, psutil.virtual_memory().available - int(config.node.min_free_memory_gb * 2**30))


#: Bytes of randomness in a token a peer makes for its API (256 bits, URL-safe base64: 43 characters).
API_TOKEN_BYTES = 32


def with_api_token(config: Config) -> Config:
    """``config`` with the token its API asks for: the configured one (``--api-token``, ``api.token``,
    ``$MESHNODE_API_TOKEN``); else, when the API listens on more than loopback, ``<data dir>/api-token``,
    made on first start (random, mode 0600, written atomically). A loopback API without a token stays open,
    as does an API that is off. A token file that group or others may read is refused
    (``INSECURE_PERMISSIONS``)."""
    api = config.api
    if api.token or not api.listen or is_loopback_bind(api.listen):
        return config
    path = config.data_path / API_TOKEN_FILE
    token = read_token_file(config.data_path)
    if token is None:
        token = secrets.token_urlsafe(API_TOKEN_BYTES)
        atomic_write(path, (token + "\n").encode(), mode=0o600)
        log.info("api on %s without a token: made one in %s", api.listen, path,
                 extra={"event": "api_token_created", "path": str(path)})
    else:
        log.info("api on %s: using the token in %s", api.listen, path, extra={"event": "api_token_read"})
    return dataclasses.replace(config, api=dataclasses.replace(api, token=token))


async def admission(config: Config, identity: Identity, transport: Transport) -> tuple[Membership | None, Config]:
    """Which mesh this peer takes part in, and the config to run with (bootstrap: addresses only):

    - ``--open``: an open mesh, no admission (logged as a warning);
    - the data dir's membership, when it has one (a restart needs no token; an invite of the same mesh is
      not used, one of another mesh is refused: WRONG_MESH);
    - an invite (``--join TOKEN``, or a token among ``--bootstrap``): redeemed at its issuer, then saved;
    - neither, and no bootstrap: a new mesh, founded here;
    - neither, with bootstrap addresses only: NOT_A_MEMBER (never a second mesh founded by accident)."""
    net, data_dir = config.network, config.data_path
    tokens = [b for b in net.bootstrap if b.strip().startswith(adm.INVITE_PREFIX)] + ([net.join] if net.join else [])
    addrs = tuple(b for b in net.bootstrap if not b.strip().startswith(adm.INVITE_PREFIX))
    invite = adm.parse_invite(tokens[0]) if tokens else None
    dial = tuple(a for a in (invite.addrs if invite else ()) if is_loopback_addr(a) or not net.loopback_only)
    config = dataclasses.replace(config, network=dataclasses.replace(net, bootstrap=addrs + dial, join=""))
    if net.open:
        if invite is not None:
            raise ConfigError("--open runs an open mesh: an invite token does not go with it")
        log.warning("open mesh: anyone who can reach this peer takes part (no invites, no admission)",
                    extra={"event": "open_mesh", "code": "OPEN_MESH"})
        return None, config
    membership = await trio.to_thread.run_sync(credential.load, data_dir, identity)
    if membership is not None:
        if not membership.roster.is_member(identity.node_id):
            raise adm.AdmissionError(
                f"this peer was revoked from {membership.mesh}: its members refuse it. To take part again, move "
                f"{data_dir / credential.MEMBERSHIP_FILE} away and start with a new invite (--join TOKEN)",
                code="REVOKED")
        if invite is not None and invite.mesh != membership.mesh:
            raise adm.AdmissionError(f"{data_dir} is a member of {membership.mesh}; the invite is for {invite.mesh} "
                                     f"(use another --data-dir to join that mesh)", code="WRONG_MESH")
        return membership, config
    if invite is not None:
        chain = await redeem(transport, invite)
        membership = await trio.to_thread.run_sync(credential.joined, data_dir, chain, identity)
        log.info("joined mesh %s through %s", membership.mesh, invite.issuer,
                 extra={"event": "joined", "mesh": membership.mesh, "peer": invite.issuer})
        return membership, config
    if addrs:
        raise adm.AdmissionError(
            f"{data_dir} belongs to no mesh, and {addrs[0]} is an address, not an invite: ask a member for one "
            f"(`meshnode invite` on that machine) and start with --join TOKEN (or --bootstrap TOKEN); "
            f"--open runs an open mesh instead", code="NOT_A_MEMBER")
    return await trio.to_thread.run_sync(credential.found, data_dir, identity, time.time()), config


async def run(config: Config, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    """Run one peer until it has drained (``Node.request_drain``) or is cancelled. Its ``config`` is the
    one given with the API token filled in (``with_api_token``)."""
    config = with_api_token(config)
    data_dir = config.data_path
    identity = load_or_create(data_dir)
    gpus = await trio.to_thread.run_sync(hardware.gpus)
    if config.node.compute_gflops > 0:
        flops = config.node.compute_gflops * 1e9
        log.info("compute score %.2f GFLOP/s as configured (not measured)", config.node.compute_gflops)
    else:
        flops = await trio.to_thread.run_sync(hardware.measure_flops, config.node.benchmark_seconds)
    if config.node.memory_bandwidth_gbps > 0:
        bandwidth = config.node.memory_bandwidth_gbps * 1e9
        log.info("memory bandwidth %.1f GB/s as configured (not measured)", config.node.memory_bandwidth_gbps)
    else:
        bandwidth = await trio.to_thread.run_sync(hardware.measure_bandwidth, config.node.benchmark_seconds)
    # Before the node starts: measured beside a stage's first load, transformers' lazy imports in two threads
    # can stall each other.
    overhead = await trio.to_thread.run_sync(hardware.measure_overhead) if config.node.benchmark_seconds > 0 else {}
    kernels = await trio.to_thread.run_sync(hardware.measure_kernels, config.node.benchmark_seconds / 4)
    m = config.membership
    profile = PeerProfile(
        version=VERSION, name=config.node.name, incarnation=int(time.time() * 1000),
        accept_public_jobs=config.node.accept_public_jobs,
        min_free_memory_gb=config.node.min_free_memory_gb,
        layer_memory_bytes=layer_memory(config),
        features_supported=("gossip-v1", "election-v1", *await trio.to_thread.run_sync(hardware.bf16_features)),
    )
    core = PeerCore(identity, profile, m, trio.current_time())
    st = config.storage
    locks = LockTimeouts(task=st.task_lock_timeout, file=st.file_lock_timeout, stale=st.stale_lock_age)
    store = await trio.to_thread.run_sync(functools.partial(Store, data_dir / "store", identity, locks=locks))
    async with Transport.open(identity, config.network.listen, mdns=config.network.mdns,
                              loopback_only=config.network.loopback_only,
                              gossip_heartbeat=m.heartbeat_interval) as transport:
        membership, config = await admission(config, identity, transport)
        node = Node(config, identity, core, transport, gpus, flops, store, membership=membership,
                    bandwidth=bandwidth, overhead=overhead, kernels=kernels)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: node.run(api=serve_api, task_status=task_status))
            if membership is not None:  # the mesh and how to invite; never a secret
                api = f" --api {node.api_url.removeprefix('http://')}" if node.api_url else ""
                print(f"  mesh {membership.mesh} ({len(membership.roster.members())} members known); "
                      f"invite a peer: meshnode invite{api}", flush=True)
            atomic_write(data_dir / NODE_FILE, json.dumps(
                {"node_id": node.node_id, "addrs": transport.addrs(), "api": node.api_url, "pid": os.getpid()}
            ).encode())
            task_status.started(node)
    log.info("peer %s stopped", identity.node_id, extra={"event": "stopped", "node_id": identity.node_id})
