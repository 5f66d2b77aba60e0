"""Config: every option has a flag and a key; flags beat the file, the file beats defaults."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from mesh import config as cfg
from mesh.app.cli import make_parser
from mesh.app.client import format_status
from mesh.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_field_has_exactly_one_option() -> None:
    keys = {f"{s.name}.{f.name}" for s in fields(cfg.Config) for f in fields(s.default_factory())}  # type: ignore[misc]
    assert keys == {o.key for o in cfg.OPTIONS}
    assert len({o.flag for o in cfg.OPTIONS}) == len(cfg.OPTIONS)


def test_shipped_configs_load_and_default_toml_matches_the_builtin_defaults() -> None:
    assert cfg.build(file=ROOT / "configs" / "default.toml") == cfg.Config()
    local = cfg.build(file=ROOT / "configs" / "local-3.toml")
    assert local.network.listen == ("/ip4/127.0.0.1/tcp/0",) and not local.network.mdns
    assert local.network.loopback_only and local.api.listen == "127.0.0.1:0"


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[node]\nname = "from-file"\n[network]\nmdns = true\nbootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/x"]\n')
    args = make_parser().parse_args(["start", "--config", str(f), "--no-mdns", "--name", "from-flag",
                                     "--heartbeat-interval", "0.5", "--suspect-after", "0.8",
                                     "--compute-gflops", "12.5"])
    c = cfg.build(args)
    assert c.node.name == "from-flag" and c.network.mdns is False
    assert c.network.bootstrap == ("/ip4/127.0.0.1/tcp/1/p2p/x",)
    assert c.membership.heartbeat_interval == 0.5 and c.node.compute_gflops == 12.5
    # 0 turns link measurement off (hops cost --hop-ms): a test or a user pins the link model with it.
    assert cfg.build(make_parser().parse_args(["start", "--link-interval", "0"])).coordinator.link_interval == 0


@pytest.mark.parametrize(
    "text",
    ['[node]\nnmae = "typo"\n', '[nodes]\nname = "x"\n', "[node]\nrequire_gpu = 3\n", "not toml [",
     "[membership]\nsuspect_after = 5.0\n", "[node]\ncompute_gflops = -1.0\n",
     "[coordinator]\nlink_interval = -1.0\n"],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        cfg.build(argparse.Namespace(config=str(f)))
    assert err.value.code == "INVALID_CONFIG"


def test_status_table_names_every_peer_and_the_coordinator() -> None:
    hw = {"gpus": [{"name": "RTX 4090", "memory_gb": 24.0, "usage": 0.1}], "cpu_cores": 8, "memory_gb": 32.0,
          "memory_free_gb": 20.0, "load": 0.25}
    nodes = {"coordinator": "12D3KooWAAAAAAAAAAAAAAAA", "term": 4, "nodes": [
        {"node_id": "12D3KooWAAAAAAAAAAAAAAAA", "name": "a", "status": "ready", "is_coordinator": True,
         "is_self": True, "hardware": hw, "compute_flops": 2.5e12},
        {"node_id": "12D3KooWBBBBBBBBBBBBBBBB", "name": "b", "status": "offline", "is_coordinator": False,
         "is_self": False, "hardware": hw | {"gpus": []}, "compute_flops": 1e11},
    ]}
    text = format_status(nodes)
    lines = text.splitlines()
    assert len(lines) == 4
    assert "coordinator (self)" in lines[1] and "RTX 4090" in lines[1] and "2500.0" in lines[1]
    assert "offline" in lines[2] and lines[3].endswith("term: 4")
