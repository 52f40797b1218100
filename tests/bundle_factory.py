"""One place where tests get a built bundle: ``BundleFactory.get(*build_args)`` runs
``mobile-export build ARGS -o <its own folder> --quiet`` once per session per argument list and
hands every later caller the same folder (the ``build_bundle`` fixture in conftest).

Bundles it returns are read-only to tests: copy one to change it. With ``--dist loadfile`` each
pytest-xdist worker has its own factory, so identical builds requested from files that run on
different workers are built once per worker; tests that share a build sit in one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Built:
    """A bundle the factory built: its folder, manifest and what ``build`` printed."""

    bundle: Path
    manifest: dict
    output: str


class BundleFactory:
    """Memoized ``mobile-export build``: one build per distinct argument list."""

    def __init__(self, root_for) -> None:
        self._root_for = root_for  # name -> a fresh folder (tmp_path_factory.mktemp)
        self._made: dict[tuple[str, ...], Built] = {}

    def get(self, *args) -> Built:
        """The bundle ``build *args`` writes (``-o`` and ``--quiet`` are added here)."""
        from click.testing import CliRunner

        from mobile_export.cli import main

        key = tuple(str(a) for a in args)
        if key not in self._made:
            out = self._root_for("bundle")
            result = CliRunner().invoke(main, ["build", *key, "-o", str(out), "--quiet"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            (bundle,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
            manifest = json.loads((bundle / "manifest.json").read_text())
            self._made[key] = Built(bundle, manifest, result.output)
        return self._made[key]

    def __len__(self) -> int:
        return len(self._made)
