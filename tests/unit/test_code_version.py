"""The code version a switch node reports: package version and source fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearinghouse.code_version import FINGERPRINT_HEX_DIGITS, code_version, source_fingerprint

pytestmark = pytest.mark.unit


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_fingerprint_follows_every_source_file(tmp_path: Path) -> None:
    base = {"pkg/a.py": "A = 1\n", "pkg/sub/b.py": "B = 2\n", "pkg/notes.txt": "x"}

    def fingerprint(name: str, files: dict[str, str]) -> str:
        return source_fingerprint((_tree(tmp_path / name, files) / "pkg",))

    first = fingerprint("one", base)
    assert fingerprint("two", base) == first  # where the checkout lives does not matter
    edited = fingerprint("three", base | {"pkg/a.py": "A = 2\n"})
    added = fingerprint("four", base | {"pkg/c.py": ""})
    renamed = fingerprint("five", {"pkg/a.py": "A = 1\n", "pkg/b.py": "B = 2\n"})
    assert len({first, edited, added, renamed}) == 4
    assert fingerprint("six", base | {"pkg/notes.txt": "y"}) == first  # only Python counts


def test_this_process_reports_its_package_version_and_a_short_fingerprint() -> None:
    version, _, fingerprint = code_version().partition("+")
    assert version == "0.1.0"
    assert len(fingerprint) == FINGERPRINT_HEX_DIGITS
    int(fingerprint, 16)
