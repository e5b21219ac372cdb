"""Where the local cluster keeps its state, caches and logs (all git-ignored)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CASSANDRA_VERSION = "5.0.9"


def repo_root() -> Path:
    """The checkout this package runs from (``services/clearinghouse/..``)."""
    return Path(__file__).resolve().parents[3]


@dataclass(frozen=True, slots=True)
class Paths:
    root: Path
    state: Path
    cache: Path

    @classmethod
    def default(cls, state: Path | None = None) -> Paths:
        root = repo_root()
        return cls(root=root, state=(state or root / ".state").resolve(), cache=root / ".cache")

    @property
    def cassandra_lib(self) -> Path:
        return self.cache / f"cassandra-{CASSANDRA_VERSION}" / "lib"

    @property
    def cluster_file(self) -> Path:
        """What ``cluster up`` started with (node counts), so later commands agree."""
        return self.state / "cluster.json"

    def component_dir(self, component: str, name: str) -> Path:
        return self.state / component / name

    @property
    def cluster_templates(self) -> Path:
        return self.root / "cluster"
