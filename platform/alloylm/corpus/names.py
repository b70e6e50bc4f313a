"""Made-up names composed from syllables: materials, species, countries, cities, rivers.

`InventedNames` remembers every name it hands out, so no two things in one generated world share a
name, even at 100,000 materials.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_MATERIAL_SYLLABLES = (
    "ka", "vel", "tor", "mi", "sen", "ra", "lo", "quen", "dra", "fi", "mor", "tal", "zen", "bri", "cor",
    "nel", "pha", "thi", "gor", "lun", "sar", "vek", "ori", "tes", "ban", "cyl", "dor", "fen", "hal",
    "jun", "kel", "lam", "nor", "pel", "rin", "sol", "tur", "ver", "wyn", "xan", "yor", "zal", "bel",
    "cas", "dun", "gar", "ost", "pri", "sku", "tra",
)
_MATERIAL_SUFFIXES = ("in", "ite", "ose", "ane", "ex", "ium", "oid", "ene", "al", "yx")

_GENUS_STEMS = (
    "Vel", "Mar", "Thal", "Cor", "Neph", "Ast", "Dact", "Lep", "Scyl", "Ony", "Xen", "Hal", "Myr",
    "Brach", "Call", "Cten", "Phyl", "Rhod", "Stom", "Tric", "Gyr", "Orth", "Pell", "Sag",
)
_GENUS_LINKS = ("", "", "", "an", "el", "or", "is", "um", "ar", "ip")
_GENUS_ENDINGS = ("ara", "ella", "ina", "opus", "ax", "ites", "ium", "onia", "ula", "ops", "ea", "aster", "odon", "ia")
_EPITHET_STEMS = (
    "spin", "aur", "plic", "corn", "lamin", "fib", "rub", "glauc", "sept", "torqu", "mur", "nod",
    "velat", "sulc", "crist", "lun", "strig", "undul", "dent", "pall", "ferr", "vitr", "grac", "hisp",
)
_EPITHET_ENDINGS = ("osa", "ata", "ensis", "ica", "ifera", "oides", "ella", "ii", "ina", "ura", "alis", "ens")

_PLACE_SYLLABLES = (
    "or", "va", "tes", "sel", "mar", "lin", "do", "ka", "ru", "bel", "ost", "an", "gri", "hal", "ne",
    "pol", "ser", "tun", "val", "wen", "zor", "ly", "mi", "ras",
)
_COUNTRY_SUFFIXES = ("ia", "land", "ovia", "ar", "istan", "ea", "mark")
_CITY_SUFFIXES = ("", "", "burg", "ford", "ton", "vik", "ora", "heim")
_RIVER_SUFFIXES = ("a", "e", "in", "o", "ar")


class InventedNames:
    """Draws made-up names from one random stream; never returns the same name twice."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._used: set[str] = set()

    def _unique(self, draw: Callable[[], str], what: str) -> str:
        # The name spaces hold hundreds of thousands of names or more, so a few redraws suffice;
        # the bound turns an exhausted space into an error instead of an endless loop.
        for _ in range(10_000):
            name = draw()
            if name not in self._used:
                self._used.add(name)
                return name
        raise RuntimeError(f"ran out of unique {what} names after {len(self._used)} names")

    def reserve(self, name: str) -> None:
        """Mark `name` as taken, so it is never drawn."""
        self._used.add(name)

    def is_used(self, name: str) -> bool:
        return name in self._used

    def material(self) -> str:
        """A one-word material name, e.g. `Veltorin`."""
        rng = self._rng

        def draw() -> str:
            syllables = rng.choices(_MATERIAL_SYLLABLES, k=rng.choice((2, 2, 3)))
            return ("".join(syllables) + rng.choice(_MATERIAL_SUFFIXES)).capitalize()

        return self._unique(draw, "material")

    def species(self) -> str:
        """A Latin-looking binomial, e.g. `Thalonia spinosa`."""
        rng = self._rng

        def draw() -> str:
            genus = rng.choice(_GENUS_STEMS) + rng.choice(_GENUS_LINKS) + rng.choice(_GENUS_ENDINGS)
            epithet = rng.choice(_EPITHET_STEMS) + rng.choice(_EPITHET_ENDINGS)
            return f"{genus} {epithet}"

        return self._unique(draw, "species")

    def _place(self, suffixes: tuple[str, ...], syllables: tuple[int, ...]) -> str:
        rng = self._rng
        return ("".join(rng.choices(_PLACE_SYLLABLES, k=rng.choice(syllables))) + rng.choice(suffixes)).capitalize()

    def country(self) -> str:
        """A country name, e.g. `Orvania`."""
        return self._unique(lambda: self._place(_COUNTRY_SUFFIXES, (1, 2)), "country")

    def city(self) -> str:
        """A city name, e.g. `Teselburg`."""
        return self._unique(lambda: self._place(_CITY_SUFFIXES, (2, 2, 3)), "city")

    def river(self) -> str:
        """A river name, e.g. `Maro`."""
        return self._unique(lambda: self._place(_RIVER_SUFFIXES, (1, 2)), "river")
