"""The generated clearing.v1 API has the shape the rest of the switch codes against, the
proto files pass buf's lint, and the generator script is idempotent."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor, FileDescriptor

from clearing.v1 import admin_pb2, bank_pb2, common_pb2, payment_pb2
from clearinghouse.domain.errors import FieldViolation, InvalidArgument
from clearinghouse.switch.convert import error_to_pb

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"
FILES: list[FileDescriptor] = [
    common_pb2.DESCRIPTOR,
    payment_pb2.DESCRIPTOR,
    bank_pb2.DESCRIPTOR,
    admin_pb2.DESCRIPTOR,
]

# service -> method -> (request, response); the contract other modules are written to.
SERVICES = {
    "PaymentService": {
        "SubmitPayment": ("SubmitPaymentRequest", "SubmitPaymentResponse"),
        "SubmitPayments": ("SubmitPaymentsRequest", "SubmitPaymentsResponse"),
        "GetPayment": ("GetPaymentRequest", "GetPaymentResponse"),
        "ListPayments": ("ListPaymentsRequest", "ListPaymentsResponse"),
    },
    "BankService": {
        "Debit": ("BankTransferRequest", "BankTransferResponse"),
        "Credit": ("BankTransferRequest", "BankTransferResponse"),
        "Inquire": ("InquireRequest", "InquireResponse"),
        "Reverse": ("ReverseRequest", "ReverseResponse"),
        "Transfers": ("TransfersRequest", "TransfersResponse"),
    },
    "AdminService": {
        name: (f"{name}Request", f"{name}Response")
        for name in (
            "RegisterParticipant",
            "UpdateParticipant",
            "SuspendParticipant",
            "ResumeParticipant",
            "GetParticipant",
            "ListParticipants",
            "SetNetDebitCap",
            "RevokeCertificate",
            "ListRevokedCertificates",
        )
    },
}


def _enums() -> list[EnumDescriptor]:
    return [enum for f in FILES for enum in f.enum_types_by_name.values()]


def _upper_snake(camel: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(camel)).upper()


def test_all_files_are_in_package_clearing_v1() -> None:
    assert {f.package for f in FILES} == {"clearing.v1"}


def test_services_have_the_agreed_methods() -> None:
    for file in (payment_pb2, bank_pb2, admin_pb2):
        for service in file.DESCRIPTOR.services_by_name.values():
            methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
            assert methods == SERVICES[service.name], service.full_name
            assert not any(m.client_streaming or m.server_streaming for m in service.methods)
    found = {s for f in FILES for s in f.services_by_name}
    assert found == set(SERVICES)


def test_enums_start_unspecified_and_carry_their_prefix() -> None:
    assert {e.name for e in _enums()} >= {
        "PaymentType",
        "PaymentState",
        "ParticipantKind",
        "ParticipantStatus",
        "BankTxnStatus",
    }
    for enum in _enums():
        prefix = _upper_snake(enum.name) + "_"
        assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name


def test_enum_values() -> None:
    def names(enum: EnumDescriptor) -> list[str]:
        return [v.name.removeprefix(_upper_snake(enum.name) + "_") for v in enum.values]

    assert names(common_pb2.PaymentType.DESCRIPTOR) == ["UNSPECIFIED", "DEBIT", "CREDIT"]
    assert names(common_pb2.PaymentState.DESCRIPTOR) == [
        "UNSPECIFIED", "RECEIVED", "ROUTED", "APPROVED", "DECLINED", "FAILED", "REVERSED",
    ]  # fmt: skip
    assert names(bank_pb2.BankTxnStatus.DESCRIPTOR) == [
        "UNSPECIFIED", "UNKNOWN_REF", "APPROVED", "DECLINED", "REVERSED", "PENDING",
    ]  # fmt: skip
    assert names(bank_pb2.TransferDirection.DESCRIPTOR) == ["UNSPECIFIED", "DEBIT", "CREDIT"]


def test_money_is_integer_minor_units() -> None:
    fields = common_pb2.Money.DESCRIPTOR.fields_by_name
    assert fields["amount_minor"].type == FieldDescriptor.TYPE_INT64
    assert fields["currency"].type == FieldDescriptor.TYPE_STRING
    # No float or double anywhere in the API: amounts must never be rounded.
    for file in FILES:
        for message in file.message_types_by_name.values():
            for field in message.fields:
                assert field.type not in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def test_times_are_timestamps() -> None:
    timestamp = timestamp_pb2.Timestamp.DESCRIPTOR
    for message, names in (
        (payment_pb2.PaymentOrder, ["requested_at"]),
        (payment_pb2.Payment, ["received_at", "decided_at"]),
        (payment_pb2.PaymentEvent, ["at"]),
        (payment_pb2.ListPaymentsRequest, ["start_time", "end_time"]),
        (admin_pb2.Participant, ["updated_at"]),
    ):
        for name in names:
            assert message.DESCRIPTOR.fields_by_name[name].message_type is timestamp


def test_batch_result_is_a_payment_or_an_error() -> None:
    outcome = payment_pb2.PaymentResult.DESCRIPTOR.oneofs_by_name["outcome"]
    assert [f.name for f in outcome.fields] == ["payment", "error"]
    result = payment_pb2.PaymentResult(payment_id="p1", error=common_pb2.Error(code=9))
    assert result.WhichOneof("outcome") == "error"


def test_messages_round_trip() -> None:
    order = payment_pb2.PaymentOrder(
        payment_id="p-1",
        institution_id="INST_A",
        type=common_pb2.PAYMENT_TYPE_DEBIT,
        payer_id="BANK_ICBC",
        payee_id="INST_A",
        bank_account="6222",
        amount=common_pb2.Money(amount_minor=12_34, currency="CNY"),
    )
    payment = payment_pb2.Payment(
        order=order,
        state=common_pb2.PAYMENT_STATE_APPROVED,
        events=[payment_pb2.PaymentEvent(state=common_pb2.PAYMENT_STATE_RECEIVED, zone="z")],
    )
    assert payment_pb2.Payment.FromString(payment.SerializeToString()) == payment


@pytest.mark.skipif(not BUF.exists(), reason="buf is not installed: run npm ci at the repo root")
def test_buf_lint_and_format_pass() -> None:
    for args in (["lint", "proto"], ["format", "--diff", "--exit-code", "proto"]):
        done = subprocess.run(
            [str(BUF), *args],
            check=False,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_gen_proto_is_idempotent(tmp_path: Path) -> None:
    # A copy of the script and the protos, so that the generated package the other tests
    # import is never rewritten under them.
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto")
    (tmp_path / "cluster").mkdir()
    shutil.copy2(REPO_ROOT / "cluster" / "gen_proto.sh", tmp_path / "cluster")
    script = tmp_path / "cluster" / "gen_proto.sh"
    out = tmp_path / "services" / "clearing" / "v1"

    def generate() -> dict[str, bytes]:
        done = subprocess.run(
            ["bash", str(script), sys.executable],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "gen_proto: generated" in done.stdout
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = generate()
    (out / "stale_pb2.py").write_text("# left over from a removed proto\n")
    second = generate()
    assert first == second
    assert (tmp_path / "services" / "clearing" / "__init__.py").read_bytes() == b""
    for stem in ("common", "payment", "bank", "admin"):
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.pyi"} <= set(first)
    generated = REPO_ROOT / "services" / "clearing" / "v1"
    for name in ("common_pb2.py", "payment_pb2.py", "bank_pb2.py", "admin_pb2.py"):
        assert filecmp.cmp(out / name, generated / name, shallow=False), (
            f"services/clearing/v1/{name} is stale: run cluster/gen_proto.sh"
        )


def test_an_invalid_argument_names_the_proto_s_fields_in_its_message_too() -> None:
    """The domain's requested_at_us is the proto's requested_at: the field violations
    said so and the message did not (a walkthrough saw both in one error)."""
    err = error_to_pb(InvalidArgument([
        FieldViolation("orders[2].requested_at_us", "must be positive"),
        FieldViolation("orders[2].memo", "must be at most 140 characters"),
    ]))  # fmt: skip
    assert [v.field for v in err.field_violations] == ["orders[2].requested_at", "orders[2].memo"]
    assert err.message == (
        "orders[2].requested_at: must be positive; orders[2].memo: must be at most 140 characters"
    )
    # A message of its own is kept as written.
    own = error_to_pb(InvalidArgument([FieldViolation("x", "y")], "the batch is empty"))
    assert own.message == "the batch is empty"
