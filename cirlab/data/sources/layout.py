"""Where a source expects its files, and the errors that show it, so a wrong root or folder is fixed in one go."""

from __future__ import annotations

from pathlib import Path

from cirlab.errors import CirlabError


class ImageNotFound(CirlabError):
    """An image the annotations name is not on disk: the data check lists these instead of stopping."""


class FolderLayout:
    """The folder tree(s) a source accepts and its errors for what is missing (a `CIRSource` part)."""

    name: str  # the source's name: every error starts with it
    layout: str = ""  # the expected folder tree(s), shown when something is missing
    readme_section: str = ""
    detected: str = ""  # which accepted layout was found on disk, for sources that accept several

    def layout_help(self) -> str:
        """The accepted tree(s) and what was found."""
        return (
            f"Expected layout under dataset.root:\n{self.layout}"
            + (f"\nDetected: {self.detected}" if self.detected else "")
            + (
                f"\nWhere to get the data: README section '{self.readme_section}'."
                if self.readme_section
                else ""
            )
        )

    def missing_image(self, what: str) -> ImageNotFound:
        """The error for an absent image: where it was looked for, the accepted layouts, how to list them all."""
        return ImageNotFound(
            f"{self.name}: {what}\n{self.layout_help()}\n`cirlab +task=check_data "
            f"dataset={self.name} dataset.root=...` lists every missing image."
        )

    def require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise CirlabError(f"{self.name}: {what} folder not found: {path}\n{self.layout_help()}")
        return path

    def require_file(self, path: Path, what: str) -> Path:
        if not path.is_file():
            raise CirlabError(f"{self.name}: {what} not found: {path}\n{self.layout_help()}")
        return path
