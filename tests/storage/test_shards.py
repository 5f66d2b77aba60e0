"""Shards and manifests: split, sign, verify, reassemble; tampering is refused with its code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cbor2
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.wire import seal
from storage.manifest import MANIFEST, encode_manifest, open_manifest, seal_manifest
from storage.metadata import layers_of
from storage.shards import ShardHashMismatch, ShardSizeMismatch, shard_path, split_model, verify_shard

ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)


def build(kind: str, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                             tie_word_embeddings=True, initializer_range=0.5))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, initializer_range=0.5))
    model.save_pretrained(folder)
    return model.eval()


def split(tmp_path: Path, kind: str) -> tuple[torch.nn.Module, Path, Path, bytes]:
    src, shards = tmp_path / "src", tmp_path / "shards"
    model = build(kind, src)
    manifest = split_model(src, layers_of(src), shards, model_id=f"tiny-{kind}", revision="r1", identity=ALICE)
    return model, src, shards, seal_manifest(manifest, ALICE)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_split_sign_verify_reassemble_gives_the_same_outputs(tmp_path: Path, kind: str) -> None:
    model, _src, shards, signed = split(tmp_path, kind)
    manifest = open_manifest(signed)
    assert manifest.created_by == ALICE.node_id and manifest.total_layers == 3 + 3
    assert [s.name for s in manifest.shards] == ["embedding", "block.0", "block.1", "block.2", "norm", "head"]
    assert {f.path for f in manifest.files} >= {"config.json"}
    state: dict[str, torch.Tensor] = {}
    for shard in manifest.shards:
        tensors = load_file(verify_shard(shards, shard))  # a valid safetensors file holding this layer only
        assert sorted(tensors) == [t.name for t in shard.tensors]
        assert all(tuple(tensors[t.name].shape) == t.shape for t in shard.tensors)
        state |= tensors
    assert manifest.shards[-1].tied_to == "embedding" and manifest.shards[-1].tensors == ()
    rebuilt = AutoModelForCausalLM.from_config(model.config).eval()
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # the tied head shares the embedding
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_splitting_again_gives_the_same_shards(tmp_path: Path) -> None:
    _, src, _shards, signed = split(tmp_path, "llama")
    again = split_model(src, layers_of(src), tmp_path / "again", model_id="tiny-llama", revision="r1",
                        identity=ALICE)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in open_manifest(signed).shards]


def test_a_flipped_byte_or_a_truncated_shard_is_refused(tmp_path: Path) -> None:
    _, _, shards, signed = split(tmp_path, "llama")
    manifest = open_manifest(signed)
    block, norm = manifest.shards[1], manifest.shards[4]
    path = shard_path(shards, block.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardHashMismatch) as err:
        verify_shard(shards, block)
    assert err.value.code == "SHARD_HASH_MISMATCH"
    path = shard_path(shards, norm.sha256)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ShardSizeMismatch) as err:
        verify_shard(shards, norm)
    assert err.value.code == "SHARD_SIZE_MISMATCH"


def test_forged_and_malformed_manifests_are_refused_with_codes(tmp_path: Path) -> None:
    _, _, _, signed = split(tmp_path, "gpt2")
    manifest = open_manifest(signed)
    env = cbor2.loads(signed)
    cases = {
        "BAD_SIGNATURE": cbor2.dumps(env | {"s": bytes(64)}),
        # Signed by Mallory while claiming Alice made it.
        "MANIFEST_SIGNER_MISMATCH": seal(MANIFEST, encode_manifest(manifest), MALLORY),
        "MALFORMED_MESSAGE": seal(MANIFEST, b"\xff not cbor", ALICE),
        "UNKNOWN_MESSAGE_KIND": seal("node_info", encode_manifest(manifest), ALICE),
        "MESSAGE_TOO_LARGE": b"\x00" * (5 * 2**20),
    }
    bad_path = dataclasses.replace(manifest, files=(dataclasses.replace(manifest.files[0], path="../../etc/passwd"),))
    cases["MALFORMED_MESSAGE/path"] = seal_manifest(bad_path, ALICE)
    gap = dataclasses.replace(manifest, shards=manifest.shards[:1] + manifest.shards[2:])
    cases["MALFORMED_MESSAGE/gap"] = seal_manifest(gap, ALICE)
    for code, data in cases.items():
        with pytest.raises(PeerError) as err:
            open_manifest(data)
        assert err.value.code == code.split("/")[0], (code, err.value)
