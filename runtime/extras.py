"""Optional features and the pyproject extra that installs each one's package.

A feature whose package is missing fails before it starts, with one line that names the
extra to install, rather than an ImportError traceback halfway through a demo.
"""
from __future__ import annotations

import importlib.util

from edgesplit.partitioner.errors import UsageError

# extra -> (module imported, package installed): keep in step with [project.optional-dependencies]
EXTRAS: dict[str, tuple[str, str]] = {
    "classwise": ("sklearn", "scikit-learn"),
    "images": ("PIL", "Pillow"),
    "bench": ("matplotlib", "matplotlib"),
}


def has_extra(extra: str) -> bool:
    """Whether ``extra``'s package is importable (looked up, not imported: importing scikit-learn takes seconds)."""
    module, _ = EXTRAS[extra]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, feature: str, instead: str = "") -> None:
    """Raise a one-line UsageError unless ``extra`` is installed, e.g. "class-wise mode needs scikit-learn: ...".

    Args:
        extra: a key of EXTRAS.
        feature: what needs it, as the message's subject.
        instead: what the user can do without it (appended in parentheses).
    """
    if not has_extra(extra):
        raise UsageError(f"{feature} needs {EXTRAS[extra][1]}: pip install 'edgesplit[{extra}]'"
                         + (f" ({instead})" if instead else ""))
