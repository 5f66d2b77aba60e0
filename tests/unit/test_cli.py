"""Every command's --help works and names its options (the README's commands are run by the tests that use
them: models add/list/show, generate --local/--json, start, status, plan, ...)."""

from __future__ import annotations

import argparse

import pytest

from mesh.app.cli import main, make_parser


def commands() -> list[list[str]]:
    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append(path)
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, [*path, name])
    walk(make_parser(), [])
    return out


WANT = {("models", "add"): ["--weights", "auto|float32|bfloat16|float16|int8|int4"],
        ("generate",): ["--local", "--json", "--data-dir", "--compute-dtype"],
        ("start",): ["--compute-dtype", "--bootstrap"]}


@pytest.mark.parametrize("path", commands(), ids=" ".join)
def test_every_command_has_help(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: meshnode")
    for needle in WANT.get(tuple(path), []):
        assert needle.split("|")[0] in text, needle


def test_generate_local_needs_a_model(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--local", "--data-dir", str(tmp_path), "hi"]) == 2
    assert "INVALID_PARAMETER" in capsys.readouterr().err
    assert main(["generate", "--local", "--data-dir", str(tmp_path), "--model", "nope", "hi"]) == 2
    assert "MODEL_NOT_AVAILABLE" in capsys.readouterr().err


def test_store_options_stand_before_or_after_the_subcommand(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "src")
    before, after = tmp_path / "before", tmp_path / "after"
    assert main(["models", "--data-dir", str(before), "add", str(tmp_path / "src"), "--id", "t"]) == 0
    assert main(["models", "add", str(tmp_path / "src"), "--id", "t", "--data-dir", str(after)]) == 0
    capsys.readouterr()
    for where in (before, after):
        assert main(["models", "list", "--json", "--data-dir", str(where)]) == 0
        assert [m["id"] for m in json.loads(capsys.readouterr().out)] == ["t"]
        assert main(["models", "show", "t", "--data-dir", str(where)]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == "t"
    assert main(["models", "show", "t", "--data-dir", str(tmp_path / "empty")]) == 2  # the option is honoured
    assert not (tmp_path / "src" / "store").exists()


def test_output_to_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """`meshnode models list --json | head -c 1`: the reader is gone before the first write."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mesh.app.cli", "models", "list", "--json", "--data-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the child has imported what it needs to print
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
