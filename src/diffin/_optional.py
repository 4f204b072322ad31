"""Optional dependencies: imported where they are needed, never at module level, so that
``import diffin`` needs only what scoring needs."""

from __future__ import annotations

import importlib
from types import ModuleType

from ._errors import MissingExtraError


def require(module: str, package: str, what: str, extra: str = "tasks") -> ModuleType:
    """Import ``module`` (from the pip package ``package``) or raise :class:`MissingExtraError`
    naming ``what`` needs it and the extra that installs it (``pip install 'diffin[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the {package} package, which is not installed: pip install 'diffin[{extra}]' "
            f"(or pip install {package})"
        ) from e
