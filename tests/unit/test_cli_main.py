"""``clearingctl`` itself: its entry point (a closed pipe, a message of an unknown name)
and the help texts of ``cluster`` and ``drill``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from clearinghouse import cli
from clearinghouse.drill import runner

pytestmark = pytest.mark.unit

CLI_RUN_S = 60.0
# What the console script ``clearingctl`` runs.
ENTRY_POINT = "import sys; from clearinghouse.cli import main; sys.exit(main())"


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("unbuffered", [False, True])  # met at exit, or at the print
def test_a_reader_that_closed_the_pipe_ends_the_command_quietly(
    unbuffered: bool, tmp_path: Path
) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    argv = ["pki", "--dir", str(tmp_path / "pki"), "signing-key", "public", "--key", str(key)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["CLEARING_STATE_DIR"] = str(tmp_path / "state")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` done reading before the command writes
    try:
        done = subprocess.run(
            [sys.executable, "-c", ENTRY_POINT, *argv],
            stdout=write_end, stderr=subprocess.PIPE, timeout=CLI_RUN_S, check=False,
            env=env,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr.decode() == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert done.returncode == cli.EXIT_BROKEN_PIPE == 128 + signal.SIGPIPE


def test_an_unknown_zone_is_named_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    # The KeyError of Topology.zone, which `cluster stop switch@mars` meets as well.
    assert cli.main(["audit", "windows", "--zone", "mars"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("clearingctl: unknown zone 'mars'; zones are ")
    assert '"' not in err


def test_cluster_up_help_says_it_starts_the_switch_nodes() -> None:
    cluster = _subparsers(cli.build_parser()).choices["cluster"]
    (up,) = [a for a in _subparsers(cluster)._choices_actions if a.dest == "up"]
    assert up.help is not None and "switch node per zone" in up.help
    assert "etcd" in up.help and "Cassandra" in up.help and "schema" in up.help


def test_drill_help_shows_its_defaults() -> None:
    drill = _subparsers(cli.build_parser()).choices["drill"]
    text = " ".join(drill.format_help().split())  # as wrapped at any terminal width
    assert f"(default: {runner.LEDGER_WAIT_S:g})" in text.split("--ledger-wait-s")[2]
    assert f"(default: {runner.REPAIR_AFTER_S:g})" in text.split("--repair-after-s")[2]


def test_a_repair_with_no_cassandra_node_running_says_to_start_the_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["--state-dir", str(tmp_path), "cluster", "repair"])

    err = capsys.readouterr().err
    assert status == 1
    assert "no Cassandra node runs at all" in err and "clearingctl cluster up" in err
    assert "repair from another city" not in err  # not the command just run
