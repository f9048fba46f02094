"""Where the Hydra config folder is: the CLI composes from it and tasks read its defaults."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
# an installed wheel carries conf/ inside the package; a source checkout has it beside the package
CONF = next(p for p in (HERE / "conf", HERE.parent / "conf") if p.is_dir())
