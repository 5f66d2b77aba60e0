"""A real ``meshnode start`` whose API binds every interface (0.0.0.0) without a token makes one: it is in its
data dir (0600) and on its stdout, the API refuses requests without it, the real ``openai`` client with
``api_key=TOKEN`` works and a wrong key gets openai's AuthenticationError, and ``meshnode status`` finds the
token in the data dir. Every connection goes to 127.0.0.1."""

from __future__ import annotations

import os
import re
from pathlib import Path

import openai
import pytest

from mesh.app import cli
from mesh.app.client import API_TOKEN_FILE, TOKEN_HOW, api_get
from mesh.app.localmesh import LocalMesh
from mesh.errors import MeshError

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")


def test_an_api_on_every_interface_makes_a_token_and_the_openai_client_uses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHNODE_API_TOKEN", raising=False)
    with LocalMesh(tmp_path, CONFIG, extra_args=("--compute-gflops", "10", "--api", "0.0.0.0:0")) as mesh:
        peer = mesh.start_peer("a")
        node_file = (peer.data_dir / "node.json").read_text()
        assert '"api": "http://0.0.0.0:' in node_file, node_file  # bound on every interface
        api = peer.api
        assert api.startswith("http://127.0.0.1:"), api  # and reached through loopback only

        path = peer.data_dir / API_TOKEN_FILE
        token = path.read_text().strip()
        assert len(token) >= 43 and os.stat(path).st_mode & 0o777 == 0o600
        printed = re.findall(r"api token \(in (\S+)\): (\S+)", peer.log_path.read_text())
        assert printed == [(str(path), token)], printed  # stdout names the file and the token

        assert api_get(api, "/api/health")["status"] == "ok"  # open: a liveness probe
        for call in (lambda: api_get(api, "/api/nodes"), lambda: api_get(api, "/v1/models", token="wrong")):
            with pytest.raises(MeshError) as refused:
                call()
            assert refused.value.code == "UNAUTHORIZED" and TOKEN_HOW in str(refused.value)
        assert peer.node_id in {n["node_id"] for n in api_get(api, "/api/nodes", token=token)["nodes"]}

        client = openai.OpenAI(base_url=f"{api}/v1", api_key=token, max_retries=0, timeout=10)
        assert client.models.list().data == []  # no model served: an empty list, with the token accepted
        wrong = openai.OpenAI(base_url=f"{api}/v1", api_key=token + "x", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as denied:
            wrong.models.list()
        assert denied.value.status_code == 401 and denied.value.code == "UNAUTHORIZED"

        port = api.rsplit(":", 1)[1]
        capsys.readouterr()
        assert cli.main(["status", "--api", f"127.0.0.1:{port}", "--data-dir", str(peer.data_dir), "--json"]) == 0
        assert peer.node_id in capsys.readouterr().out  # the CLI read the token from the data dir
        monkeypatch.setenv("MESHNODE_API_TOKEN", "not-it")  # the environment wins over the file
        assert cli.main(["status", "--api", f"127.0.0.1:{port}", "--data-dir", str(peer.data_dir)]) == 2
        err = capsys.readouterr().err
        assert "UNAUTHORIZED" in err and "--api-token" in err and token not in err, err
        records = [r for r in peer.log_records() if r.get("code") == "UNAUTHORIZED"]
        assert records and all(token not in str(r) for r in peer.log_records())  # refusals logged, never the token
