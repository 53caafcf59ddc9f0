"""State-dict name comparisons shared by the loaders and the trainers' resume."""
from __future__ import annotations

from collections.abc import Iterable


def names_text(names: Iterable[str], show: int = 8) -> str:
    """The first `show` names (sorted) and how many there are in all."""
    names = sorted(names)
    more = " …" if len(names) > show else ""
    return f"{names[:show]}{more} ({len(names)})"


def mismatch(expected: Iterable[str], found: Iterable[str], show: int = 8) -> str | None:
    """None when the two name sets agree, else 'missing [...] (n), unexpected [...] (m)'."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if not missing and not unexpected:
        return None
    return f"missing {names_text(missing, show)}, unexpected {names_text(unexpected, show)}"
