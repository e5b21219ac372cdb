"""Which code a process runs: the package's version and a fingerprint of its sources.

A switch node reads it once at start and reports it in ``ShardService/Describe``;
``clearingctl cluster status`` shows each node's and says which nodes run other code
than the checkout it is run from (a node keeps the code it started with until it is
restarted). The fingerprint covers every Python file of ``clearinghouse`` and of the
generated ``clearing`` stubs, by path and content, so an edit that is not committed
counts too.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

import clearing
import clearinghouse

PACKAGE = "clearing-switch"
# Hex digits of the SHA-256 fingerprint that are shown: 48 bits, enough to tell builds apart.
FINGERPRINT_HEX_DIGITS = 12


def source_fingerprint(roots: tuple[Path, ...]) -> str:
    """SHA-256, in hex, over every ``*.py`` file under ``roots``: each one's path relative
    to its root and its bytes, in path order."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            relative = f"{root.name}/{path.relative_to(root).as_posix()}".encode()
            content = path.read_bytes()
            for part in (relative, content):
                digest.update(len(part).to_bytes(8, "big"))
                digest.update(part)
    return digest.hexdigest()


@functools.cache
def code_version() -> str:
    """``<package version>+<fingerprint>`` of the code this process would load now; read
    once per process (a node calls it at start, before it serves)."""
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    roots = tuple(Path(p).resolve() for p in (*clearinghouse.__path__, *clearing.__path__))
    return f"{version}+{source_fingerprint(roots)[:FINGERPRINT_HEX_DIGITS]}"


__all__ = ["FINGERPRINT_HEX_DIGITS", "code_version", "source_fingerprint"]
