"""Numbers with units in free text: finding them, normalising unit spellings, converting between units.

The short-answer suite asks "is the number the model wrote the true one?": `1.2 GPa` must match
1200 MPa, `1,200 MPa` and `1.2e3 MPa` too, `MJ m^-3` is `MJ/m^3`, and a number in an unrelated unit
(a length, a temperature) is never an answer about a stress.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Unit -> (dimension, factor to the dimension's SI base). Stress and energy density share a
# dimension on purpose: 1 MJ/m^3 is 1 MPa, and papers report toughness in either.
_UNITS: dict[str, tuple[str, float]] = {
    "Pa": ("pressure", 1.0),
    "kPa": ("pressure", 1e3),
    "MPa": ("pressure", 1e6),
    "GPa": ("pressure", 1e9),
    "TPa": ("pressure", 1e12),
    "N/mm^2": ("pressure", 1e6),
    "N/m^2": ("pressure", 1.0),
    "J/m^3": ("pressure", 1.0),
    "kJ/m^3": ("pressure", 1e3),
    "MJ/m^3": ("pressure", 1e6),
    "GJ/m^3": ("pressure", 1e9),
    "J/cm^3": ("pressure", 1e6),
    "kg/m^3": ("density", 1.0),
    "g/cm^3": ("density", 1e3),
    "g/mL": ("density", 1e3),
    "g/ml": ("density", 1e3),
    "g/cc": ("density", 1e3),
    "mg/cm^3": ("density", 1.0),
    "g/L": ("density", 1.0),
    "kg/L": ("density", 1e3),
    # Units that are not answers to any numeric property, recognised so that their numbers are
    # excluded rather than taken as unitless.
    "nm": ("length", 1e-9),
    "um": ("length", 1e-6),
    "mm": ("length", 1e-3),
    "cm": ("length", 1e-2),
    "m": ("length", 1.0),
    "K": ("temperature", 1.0),
    "C": ("temperature", 1.0),
    "%": ("fraction", 0.01),
    "wt%": ("fraction", 0.01),
    "vol%": ("fraction", 0.01),
    "kV": ("voltage", 1e3),
    "bar": ("pressure_gas", 1.0),
    "h": ("time", 3600.0),
    "min": ("time", 60.0),
    "s": ("time", 1.0),
    "days": ("time", 86400.0),
    "M": ("concentration", 1.0),
}
# Spellings folded case-insensitively onto a canonical unit: nobody writes millipascal for a strength.
_CASELESS = {key.lower(): key for key in _UNITS if key not in ("M", "m", "C", "K", "s", "h")}

_SUPERSCRIPTS = str.maketrans({"³": "^3", "²": "^2", "⁻": "^-", "¹": "1", "µ": "u", "μ": "u", "·": " ", "⋅": " "})
_NUMBER = r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-−]?\.\d+"
_SCIENTIFIC = rf"(?P<number>{_NUMBER})(?:\s*(?:[eE](?P<exp>[-+]?\d+)|\s*[x×]\s*10\s*\^\s*(?P<exp10>[-+−]?\d+)))?"
# A unit: letters, %, '/', '^', digits after '^', and "m^-3"-style products, up to a sentence end.
_UNIT = r"(?P<unit>(?:wt|vol)?%|[A-Za-z]+(?:\s*/\s*[A-Za-z]+(?:\^?-?\d)?|\s+[A-Za-z]+\^?-\d|\^?-?\d(?![\d.]))*)?"
_QUANTITY = re.compile(rf"(?<![\w.])(?<![A-Za-z]-){_SCIENTIFIC}\s*{_UNIT}")


@dataclass(frozen=True)
class Quantity:
    """A number found in text, with its unit as written and as normalised (None when it has none)."""

    value: float
    unit_text: str | None
    unit: str | None  # canonical key of a known unit, or None
    start: int

    @property
    def dimension(self) -> str | None:
        return _UNITS[self.unit][0] if self.unit else None


def normalise_unit(text: str | None) -> str | None:
    """The canonical spelling of a unit (`MJ m^-3` -> `MJ/m^3`, `g/cm3` -> `g/cm^3`), None if unknown."""
    if not text:
        return None
    unit = text.translate(_SUPERSCRIPTS).strip().rstrip(".,;:)")
    # "MJ m^-3", "g cm-3": a product with a negative power is a quotient.
    unit = re.sub(r"\s+([A-Za-z]+)\^?-(\d)", r"/\1^\2", unit)
    unit = re.sub(r"\s*/\s*", "/", unit)
    unit = re.sub(r"/([A-Za-z]+)(\d)$", r"/\1^\2", unit)  # g/cm3 -> g/cm^3
    unit = unit.replace(" ", "")
    if unit in _UNITS:
        return unit
    return _CASELESS.get(unit.lower())


def _to_float(number: str, exp: str | None) -> float:
    value = float(number.replace(",", "").replace("−", "-"))
    if exp:
        value *= 10.0 ** int(exp.replace("−", "-"))
    return value


def find_quantities(text: str) -> list[Quantity]:
    """Every number in `text` with the unit that follows it, in order of appearance.

    A hyphen between two numbers (`400-420 MPa`) is a range, not a minus sign; a number inside a
    word (`X-3`, `v2`) is not a quantity.
    """
    text = text.translate(_SUPERSCRIPTS)
    found: list[Quantity] = []
    for match in _QUANTITY.finditer(text):
        number = match.group("number")
        start = match.start("number")
        if number[0] in "-−" and start > 0 and (text[start - 1].isdigit() or text[start - 1].isalpha()):
            number, start = number[1:], start + 1
        exp = match.group("exp") or match.group("exp10")
        try:
            value = _to_float(number, exp)
        except (ValueError, OverflowError):
            continue
        if not math.isfinite(value):
            continue
        unit_text = (match.group("unit") or "").strip() or None
        unit = normalise_unit(unit_text)
        if unit is None and unit_text is not None:
            # "412 MPa and" matched greedily: try the first word alone. An unknown word stays as
            # unit_text (it may be the expected unit, spelt literally) but is not a known unit.
            unit_text = unit_text.split()[0]
            unit = normalise_unit(unit_text)
        found.append(Quantity(value=value, unit_text=unit_text, unit=unit, start=start))
    return found


def convert(value: float, unit: str, to_unit: str) -> float | None:
    """`value` in `unit` expressed in `to_unit`; None when the units measure different things."""
    source, target = normalise_unit(unit), normalise_unit(to_unit)
    if source is None or target is None:
        return None
    (dim_a, factor_a), (dim_b, factor_b) = _UNITS[source], _UNITS[target]
    if dim_a != dim_b:
        return None
    return value * factor_a / factor_b


def close_enough(given: float, true: float, relative_tolerance: float) -> bool:
    """|given - true| <= tolerance * |true|; a true value of 0 needs an absolute match within tolerance."""
    if true == 0:
        return abs(given) <= relative_tolerance
    return abs(given - true) <= relative_tolerance * abs(true) * (1 + 1e-12)


def numeric_match(
    text: str, true_value: float, true_unit: str | None, *, relative_tolerance: float, require_unit: bool
) -> tuple[bool, Quantity | None]:
    """Whether `text` states `true_value` (in `true_unit`, or a unit convertible to it).

    The answer taken is the first number whose unit converts to `true_unit`; only when there is
    none, the first number with no unit at all (unless `require_unit`). A number in another
    dimension is never the answer. Returns (matched, the quantity taken as the answer).
    """
    quantities = find_quantities(text)
    unitless = [q for q in quantities if q.unit is None and (q.unit_text is None or true_unit is None or q.unit_text.lower() != true_unit.lower())]
    target = normalise_unit(true_unit) if true_unit else None
    candidate = None
    if target is not None:
        for quantity in quantities:
            if quantity.unit is not None and convert(quantity.value, quantity.unit, target) is not None:
                candidate = quantity
                break
    elif true_unit is not None:  # a unit this module does not know: matched as written
        wanted = true_unit.strip().lower()
        candidate = next((q for q in quantities if (q.unit_text or "").lower().rstrip(".,;:") == wanted), None)
    if candidate is None and not require_unit and unitless:
        candidate = unitless[0]
    if candidate is None:
        return False, None
    value = candidate.value
    if candidate.unit is not None and target is not None:
        value = convert(candidate.value, candidate.unit, target)  # type: ignore[assignment]
    return close_enough(value, true_value, relative_tolerance), candidate
