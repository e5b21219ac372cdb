"""``clearingctl participant`` / ``payment``: arguments and what they build (no cluster)."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import socket
from pathlib import Path

import pytest

from clearing.v1 import common_pb2
from clearinghouse import admin_cli, cli, topology
from clearinghouse.client import answering_zone
from clearinghouse.domain.signing import key_id_of

pytestmark = pytest.mark.unit

PUBLIC = bytes(range(32))
LINE = json.dumps({"key_id": key_id_of(PUBLIC), "public_key": base64.b64encode(PUBLIC).decode()})


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_register_builds_the_participant_the_flags_say() -> None:
    args = parse("participant", "register", "INST_NEW", "--kind", "institution", "--name",
                 "New Pay", "--currency", "CNY", "--currency", "USD", "--cap", "CNY=1000",
                 "--cap", "USD=5", "--signing-key", LINE, "--quota", "50")  # fmt: skip

    p = admin_cli._new_participant(args)

    assert (p.participant_id, p.kind, p.name) == (
        "INST_NEW",
        common_pb2.PARTICIPANT_KIND_INSTITUTION,
        "New Pay",
    )
    assert list(p.currencies) == ["CNY", "USD"]
    assert [(m.currency, m.amount_minor) for m in p.net_debit_caps] == [("CNY", 1000), ("USD", 5)]
    assert [(k.key_id, k.public_key) for k in p.signing_keys] == [(key_id_of(PUBLIC), PUBLIC)]
    assert p.payments_per_s_quota == 50


def test_a_signing_key_is_read_from_the_printed_line_or_its_file(tmp_path: Path) -> None:
    saved = tmp_path / "key.json"
    saved.write_text(LINE + "\n")
    assert admin_cli._public_key(LINE) == PUBLIC
    assert admin_cli._public_key(str(saved)) == PUBLIC


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{}", "not the line"),
        ('{"public_key": "!!"}', "not the line"),
        (json.dumps({"public_key": base64.b64encode(b"short").decode()}), "32 bytes"),
        (json.dumps({"key_id": "0" * 16, "public_key": base64.b64encode(PUBLIC).decode()}),
         "key_id"),
    ],
)  # fmt: skip
def test_a_wrong_signing_key_is_refused_before_any_call(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        admin_cli._public_key(text)


def test_a_bank_takes_no_signing_key() -> None:
    args = parse("participant", "register", "BANK_NEW", "--kind", "bank", "--name", "B",
                 "--currency", "CNY", "--signing-key", LINE)  # fmt: skip
    with pytest.raises(ValueError, match="banks sign no orders"):
        admin_cli._new_participant(args)


@pytest.mark.parametrize("cap", ["CNY", "=5", "CNY=1.5", "CNY=ten"])
def test_a_malformed_cap_is_a_usage_error(cap: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("participant", "register", "X", "--kind", "bank", "--name", "B",
              "--currency", "CNY", "--cap", cap)  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "CCY=MINOR" in err or "whole minor units" in err


@pytest.mark.parametrize("amount", ["0", "-5", "1.5"])
def test_a_payment_amount_is_positive_whole_minor_units(amount: str) -> None:
    with pytest.raises(SystemExit):
        parse("payment", "submit", "INST_A", "p-1", "--type", "debit", "--payer", "BANK_B",
              "--payee", "INST_A", "--account", "1", "--amount", amount,
              "--currency", "CNY")  # fmt: skip


def test_commands_ask_the_first_zone_whose_node_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With beijing down, the commands went to beijing-a and failed unless given --zone:
    the default is now the first zone, in the topology's order, whose port answers."""
    topo = topology.load()
    with socket.socket() as up, socket.socket() as closed:
        up.bind(("127.0.0.1", 0))
        up.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        ports = iter([closed.getsockname()[1], up.getsockname()[1]])

        def local(z: topology.Zone, port: int) -> topology.Zone:
            return dataclasses.replace(
                z, address="127.0.0.1", ports=dataclasses.replace(z.ports, switch=port)
            )

        first, second = topo.cities[0].zones
        city = dataclasses.replace(
            topo.cities[0], zones=(local(first, next(ports)), local(second, next(ports)))
        )
        probed = dataclasses.replace(topo, cities=(city, *topo.cities[1:]))
        assert answering_zone(probed, None).name == second.name
        assert f"the switch node of {first.name} does not answer" in capsys.readouterr().err
        assert answering_zone(probed, first.name).name == first.name  # asked: as asked
        none = dataclasses.replace(topo, cities=(dataclasses.replace(
            city, zones=(local(first, closed.getsockname()[1]),)),))  # fmt: skip
        assert answering_zone(none, None).name == first.name  # nobody: the first, to fail
