"""Paths named inside a folder someone else wrote (a run folder's manifest, a resume state): each
is confined to that folder (:func:`inside`), so a folder is data, never a key to the rest of the
disk."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from ._errors import CorruptManifestError, UnsafePathError


def inside(root: Path, rel: object, where: str) -> Path:
    """``root / rel`` for a path ``rel`` read from a file of the folder ``root`` (``where`` names
    that file, for the message), after checking that it stays inside ``root``.

    Refused with :class:`~diffin._errors.UnsafePathError`: an absolute path (POSIX or Windows, a
    drive or UNC prefix), a ``..`` component, a backslash, and a path that leaves ``root`` once
    symbolic links are followed (a link inside the folder to a file outside it). A ``rel`` that is
    not a non-empty string is a :class:`~diffin._errors.CorruptManifestError`. The file itself
    need not exist (readers report a missing file by name)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CorruptManifestError(f"{where}: a file entry must be a relative path (a string), got {rel!r:.200}")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in rel or ".." in posix.parts:
        raise UnsafePathError(
            f"{where}: the file entry {rel!r:.200} points outside the run folder {root}; a run folder may "
            "only name files inside it (the folder was damaged or crafted: do not use it)"
        )
    path = root / posix
    try:
        real, real_root = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # a symbolic link loop, a name too long
        raise UnsafePathError(f"{where}: the file entry {rel!r:.200} cannot be resolved inside {root} ({e})") from e
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(
            f"{where}: the file entry {rel!r:.200} is a symbolic link (or lies under one) that leads outside the "
            f"run folder {root}, to {real}; a run folder may only name files inside it (copy the files "
            "into the folder instead of linking them)"
        )
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # a missing file: the reader names it
    except OSError as e:  # a name too long, a permission, a loop
        raise CorruptManifestError(f"{where}: the file entry {rel!r:.200} cannot be read ({e.strerror})") from e
    return path
