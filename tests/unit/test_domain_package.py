"""Rules for the domain package as a whole: pure, float-free, gRPC only in errors.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clearinghouse.domain as domain

pytestmark = pytest.mark.unit

SOURCES = sorted(Path(domain.__file__).parent.glob("*.py"))
IO_MODULES = {"os", "socket", "subprocess", "time", "datetime", "random", "io", "pathlib"}


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_protobuf_no_io_and_grpc_only_in_errors(source: Path) -> None:
    imported = _imported_modules(ast.parse(source.read_text(encoding="utf-8")))
    assert "google" not in imported
    assert not imported & IO_MODULES
    if source.name != "errors.py":
        assert "grpc" not in imported


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_floats_no_true_division_no_assert(source: Path) -> None:
    # Money is integers only; true division would produce a float, and assert vanishes
    # under python -O.
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        assert not (isinstance(node, ast.Constant) and isinstance(node.value, float))
        assert not (isinstance(node, ast.Name) and node.id == "float")
        assert not isinstance(node, ast.Div)
        assert not isinstance(node, ast.Assert)


def test_public_names_are_exported() -> None:
    for name in domain.__all__:
        assert hasattr(domain, name), name
    assert len(domain.__all__) == len(set(domain.__all__))
