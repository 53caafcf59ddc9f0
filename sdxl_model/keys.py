"""State-dict comparisons: the one place that tells two sets of tensor names (and shapes) apart and says how,
for the checkpoint loaders, the text-encoder and VAE key maps, the trainers' resume and the EMA."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

SHOW = 5  # names listed per category in a report


def names_text(names: Iterable[str], show: int = 8) -> str:
    """The first `show` names (sorted) and how many there are in all: "['a', 'b'] … (12)"."""
    names = sorted(names)
    more = " …" if len(names) > show else ""
    return f"{names[:show]}{more} ({len(names)})"


def first_names(names: Iterable[str], show: int = SHOW) -> str:
    """The first `show` names (sorted), comma separated: "a, b, ..."."""
    names = sorted(names)
    return ", ".join(names[:show]) + (", ..." if len(names) > show else "")


@dataclasses.dataclass(frozen=True)
class StateMismatch:
    """How a found state (names, or names → shapes) differs from the expected one; false when it does not."""

    missing: frozenset[str] = frozenset()
    unexpected: frozenset[str] = frozenset()
    misshaped: Mapping[str, tuple[tuple, tuple]] = dataclasses.field(default_factory=dict)  # name → (found, expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def inline(self, show: int = 8) -> str:
        """One line: "missing [...] (n), unexpected [...] (m)" (+ ", wrong shape [...] (k)" when shapes differ)."""
        text = f"missing {names_text(self.missing, show)}, unexpected {names_text(self.unexpected, show)}"
        if self.misshaped:
            text += f", wrong shape {names_text(self.misshaped, show)}"
        return text

    def report(self, source: str, hint: str | None = None, show: int = SHOW) -> str:
        """Several lines: "<source> does not match the model:", then each category with counts and first names."""
        lines = [f"{source} does not match the model:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing: {first_names(self.missing, show)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected: {first_names(self.unexpected, show)}")
        if self.misshaped:
            shown = sorted(self.misshaped)[:show]
            detail = ", ".join(f"{k} (checkpoint {self.misshaped[k][0]}, model {self.misshaped[k][1]})" for k in shown)
            more = ", ..." if len(self.misshaped) > show else ""
            lines.append(f"  {len(self.misshaped)} with the wrong shape: {detail}{more}")
        if hint:
            lines.append(f"  {hint}")
        return "\n".join(lines)


def compare(expected: Iterable[str] | Mapping, found: Iterable[str] | Mapping) -> StateMismatch:
    """Names missing from `found`, names it has in excess and, when both are mappings to shapes (or tensors),
    the shared names whose shapes differ."""
    e_names, f_names = set(expected), set(found)
    misshaped = {}
    if isinstance(expected, Mapping) and isinstance(found, Mapping):
        for k in e_names & f_names:
            e, f = tuple(_shape(expected[k])), tuple(_shape(found[k]))
            if e != f:
                misshaped[k] = (f, e)
    return StateMismatch(frozenset(e_names - f_names), frozenset(f_names - e_names), misshaped)


def _shape(v):
    return v.shape if hasattr(v, "shape") else v


def mismatch(expected: Iterable[str], found: Iterable[str], show: int = 8) -> str | None:
    """None when the two name sets agree, else 'missing [...] (n), unexpected [...] (m)'."""
    m = compare(set(expected), set(found))
    return m.inline(show) if m else None


def check_state_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], *, source: str,
                       hint: str | None = None) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped tensor (counts + first names)."""
    m = compare(expected, found)
    if m:
        raise ValueError(m.report(source, hint))
