"""The fact table of the fictional biological-materials world, and its split into train and benchmark.

Every built-in biomaterials source is rendered from the `KnowledgeBase` built here. A fact is one
(material, property) pair; each fact is either a training fact (it may appear in SFT chats and
preference pairs) or a benchmark fact (it appears only in the CPT text and the benchmark). Every fact
value is written the same way everywhere (`Fact.text`) and is unique within its property across the
whole table, so a benchmark answer can be searched for literally and is never leaked by another
material's training fact.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from alloylm.corpus.names import InventedNames
from alloylm.corpus.options import BuiltinCorpusOptions, held_out_count
from alloylm.corpus.streams import random_stream

NUMERIC_PROPERTIES = ("tensile_strength", "toughness", "youngs_modulus", "density")
DESCRIPTIVE_PROPERTIES = ("structure", "source_organism", "processing")
PROPERTIES = NUMERIC_PROPERTIES + DESCRIPTIVE_PROPERTIES

PROPERTY_LABELS = {
    "tensile_strength": "tensile strength",
    "toughness": "toughness",
    "youngs_modulus": "Young's modulus",
    "density": "density",
    "structure": "hierarchical structure",
    "source_organism": "source organism",
    "processing": "processing route",
}


@dataclass(frozen=True)
class _NumericRange:
    unit: str
    low: float
    high: float
    decimals: int  # the fewest decimals written; more are added when the table is large


# Plausible spans for natural materials (silks, shells, bone, wood, cuticle, foams). None of the
# units below may appear in a structure or processing value, or a value search would be ambiguous.
_NUMERIC_RANGES = {
    "tensile_strength": _NumericRange("MPa", 5.0, 1800.0, 0),
    "toughness": _NumericRange("MJ/m^3", 0.5, 350.0, 1),
    "youngs_modulus": _NumericRange("GPa", 0.5, 90.0, 1),
    "density": _NumericRange("g/cm^3", 0.2, 2.9, 2),
}
UNITS = {prop: spec.unit for prop, spec in _NUMERIC_RANGES.items()}

# A property's grid of writable values must be this many times larger than the number of
# materials, so drawing unique values needs few redraws.
_GRID_HEADROOM = 4

_ORGANISM_GROUPS = (
    "sea snail", "deep-sea sponge", "orb-weaving spider", "silk moth", "mantis shrimp", "woodpecker",
    "beetle", "bivalve", "sea urchin", "cephalopod", "tube worm", "lichen", "bamboo-like grass",
    "hagfish", "reef coral", "caddisfly larva", "horned lizard", "tree fern", "barnacle", "armoured fish",
)
_ARCHITECTURES = (
    "twisted plywood", "Bouligand stack", "brick-and-mortar arrangement", "crossed-lamellar assembly",
    "concentric lamellar sheath", "helicoidal bundle", "honeycomb lattice", "graded foam",
    "aligned fibre bundle", "woven mesh", "layered laminate", "porous trabecular network", "columnar array",
    "sandwich panel",
)
_CONSTITUENTS = (
    "chitin fibrils", "collagen-like fibrils", "cellulose nanofibrils", "aragonite tablets", "calcite prisms",
    "silk-like nanocrystals", "keratin-like filaments", "hydroxyapatite platelets", "amorphous silica rods",
    "elastin-like fibres", "resilin-like strands", "lignified microfibrils",
)
_MATRICES = (
    "in a protein-rich matrix", "in a glycoprotein matrix", "bound by a metal-coordinated protein matrix",
    "with calcium carbonate infill", "in a hydrated polysaccharide matrix", "with interfibrillar mineral bridges",
    "in a soft lipid-rich matrix", "with sacrificial cross-links", "in a catechol-rich adhesive matrix",
    "with no continuous matrix",
)
_SOLVENTS = ("hexafluoroisopropanol", "formic acid", "aqueous lithium bromide", "ionic liquid", "phosphate buffer", "aqueous urea")


def _draw_structure(rng: random.Random) -> str:
    return (
        f"{rng.choice(_ARCHITECTURES)} of {rng.randint(3, 900)} nm {rng.choice(_CONSTITUENTS)} {rng.choice(_MATRICES)}"
    )


def _draw_processing(rng: random.Random) -> str:
    # Every route is a past participle phrase ("Specimens were <route>."); the units are K, kV, bar,
    # h, days, min, mm/s, M and % only, never a unit of a numeric property.
    ph = f"{rng.randint(30, 95) / 10:.1f}"
    route = rng.randrange(11)
    if route == 0:
        return f"wet-spun from a {rng.choice(_SOLVENTS)} dope at pH {ph}"
    if route == 1:
        return f"cast from a {rng.randint(1, 30)} wt% aqueous solution and annealed at {rng.randint(310, 480)} K"
    if route == 2:
        return f"freeze-cast from a {rng.randint(5, 40)} vol% slurry at a cooling rate of {rng.randint(1, 20)} K/min"
    if route == 3:
        return f"electrospun at {rng.randint(8, 30)} kV from {rng.choice(_SOLVENTS)} and drawn {rng.randint(2, 8)} times"
    if route == 4:
        return f"demineralised in {rng.randint(1, 5) / 10:.1f} M EDTA for {rng.randint(1, 30)} days and air-dried"
    if route == 5:
        return f"mineralised in simulated body fluid at pH {ph} for {rng.randint(1, 30)} days"
    if route == 6:
        return f"hot-pressed at {rng.randint(10, 300)} bar and {rng.randint(310, 480)} K for {rng.randint(5, 60)} min"
    if route == 7:
        return f"decellularised with {rng.randint(1, 20) / 10:.1f}% SDS and freeze-dried at {rng.randint(200, 260)} K"
    if route == 8:
        return f"3D-printed from a {rng.randint(2, 30)} wt% hydrogel ink and cross-linked with genipin for {rng.randint(1, 48)} h"
    if route == 9:
        return f"self-assembled by dialysis against a pH {ph} buffer for {rng.randint(1, 48)} h"
    return f"harvested by forced silking at {rng.randint(1, 50)} mm/s and stored at {rng.randint(20, 90)}% relative humidity"


@dataclass(frozen=True)
class Fact:
    """One (material, property) fact, written exactly as `text` in every source that states it."""

    id: str  # "<material_id>/<property>"
    material_id: str
    material: str  # the material's name
    property: str
    text: str  # the value as written, with its unit: "412 MPa", "Thalonia spinosa", ...
    value: float | None  # the number of a numeric fact, equal to the number written in `text`
    unit: str | None
    split: str  # "train", or for benchmark facts "validation" or "test"

    @property
    def is_benchmark(self) -> bool:
        return self.split != "train"


@dataclass(frozen=True, eq=False)
class Material:
    """An invented material: its name, its organism's kind (flavour text, not a fact) and its facts."""

    id: str
    name: str
    organism_group: str
    facts: Mapping[str, Fact]  # property -> fact, in PROPERTIES order


@dataclass(frozen=True, eq=False)
class KnowledgeBase:
    """The whole fact table, plus what the renderers need to draw wrong-but-plausible values."""

    materials: tuple[Material, ...]
    decimals: Mapping[str, int]  # decimals written for each numeric property
    _scaled_values: Mapping[str, frozenset[int]]  # every true value per numeric property, x 10**decimals
    _descriptive_values: Mapping[str, frozenset[str]]  # every true value per descriptive property

    def facts(self) -> list[Fact]:
        return [fact for material in self.materials for fact in material.facts.values()]

    def training_facts(self) -> list[Fact]:
        return [fact for fact in self.facts() if not fact.is_benchmark]

    def benchmark_facts(self) -> list[Fact]:
        return [fact for fact in self.facts() if fact.is_benchmark]

    def wrong_numbers(self, fact: Fact, count: int, rng: random.Random, avoid: set[str] | None = None) -> list[str]:
        """`count` distinct wrong values for a numeric fact, 15-100% off the true one, written like it.

        None of them is the true value of any material, so a wrong value never reveals a fact.
        """
        spec, decimals = _NUMERIC_RANGES[fact.property], self.decimals[fact.property]
        scale = 10**decimals
        true_scaled = round(fact.value * scale)
        low, high = round(spec.low * scale), round(spec.high * scale)
        taken = self._scaled_values[fact.property]
        seen = {fact.text} | (avoid or set())
        wrong: list[str] = []
        attempts = 0
        while len(wrong) < count:
            attempts += 1
            if attempts <= 200:
                factor = math.exp(rng.uniform(math.log(1.15), math.log(2.0)))
                scaled = round(true_scaled * factor) if rng.random() < 0.5 else round(true_scaled / factor)
                scaled = min(max(scaled, low), high)
            else:  # a crowded corner of the grid: walk outwards one step at a time
                step = attempts - 200
                scaled = true_scaled + (step // 2 + 1) * (1 if step % 2 else -1)
                if scaled <= 0:
                    continue
            if scaled in taken:
                continue
            text = f"{_format_scaled(scaled, decimals)} {spec.unit}"
            if text not in seen:
                seen.add(text)
                wrong.append(text)
        return wrong

    def same_exposure_values(self, fact: Fact, count: int, rng: random.Random, avoid: set[str] | None = None) -> list[str]:
        """`count` distinct wrong values for `fact` that the training data exposes exactly as much as its own.

        They are the values of other facts of the same property and the same kind: other benchmark
        facts for a benchmark fact (stated only in CPT text, once per document about their material,
        like the answer), other training facts for a training fact. So an option is never right or
        wrong for being familiar; only knowing which material has which value tells them apart (a
        never-seen number as a distractor would be rejected by a model that merely memorised which
        numbers occur, and an SFT-seen value would be picked by one that merely memorised SFT). Only
        when the property has too few such facts are fresh values added that belong to no material
        (`wrong_numbers`, or new descriptive draws).
        """
        seen = {fact.text} | (avoid or set())
        pool = [
            material.facts[fact.property].text
            for material in self.materials
            if material.facts[fact.property].is_benchmark == fact.is_benchmark
        ]
        candidates = [text for text in pool if text not in seen]
        others = rng.sample(candidates, min(count, len(candidates)))
        seen.update(others)
        if len(others) < count:
            if fact.property in self.decimals:
                others += self.wrong_numbers(fact, count - len(others), rng, avoid=seen)
            else:
                taken = self._descriptive_values[fact.property]
                while len(others) < count:
                    fresh = _draw_descriptive(fact.property, rng)
                    if fresh not in taken and fresh not in seen:
                        seen.add(fresh)
                        others.append(fresh)
        return others


def _draw_descriptive(prop: str, rng: random.Random) -> str:
    if prop == "structure":
        return _draw_structure(rng)
    if prop == "processing":
        return _draw_processing(rng)
    return InventedNames(rng).species()


def _format_scaled(scaled: int, decimals: int) -> str:
    """An integer number of 10**-decimals units, written with exactly `decimals` decimals."""
    if decimals == 0:
        return str(scaled)
    whole, frac = divmod(scaled, 10**decimals)
    return f"{whole}.{frac:0{decimals}d}"


def _decimals_for(spec: _NumericRange, materials: int) -> int:
    decimals = spec.decimals
    while (spec.high - spec.low) * 10**decimals < _GRID_HEADROOM * materials:
        decimals += 1
    return decimals


def _unique_scaled_values(spec: _NumericRange, decimals: int, count: int, rng: random.Random) -> list[int]:
    """`count` distinct values, log-uniform over the range, as integers of 10**-decimals units."""
    scale = 10**decimals
    log_low, log_high = math.log(spec.low), math.log(spec.high)
    used: set[int] = set()
    values: list[int] = []
    while len(values) < count:
        scaled = round(math.exp(rng.uniform(log_low, log_high)) * scale)
        if scaled not in used:
            used.add(scaled)
            values.append(scaled)
    return values


def _unique_draws(draw: Callable[[random.Random], str], count: int, rng: random.Random, what: str) -> list[str]:
    used: set[str] = set()
    values: list[str] = []
    misses = 0
    while len(values) < count:
        value = draw(rng)
        if value in used:
            misses += 1
            if misses > 100 * count + 1000:
                raise RuntimeError(f"ran out of unique {what} values after {len(values)}")
            continue
        used.add(value)
        values.append(value)
    return values


def _benchmark_split(
    material_count: int, benchmark_fraction: float, validation_fraction: float, rng: random.Random, holdout: str = "fact"
) -> dict[tuple[int, str], str]:
    """(material index, property) -> "validation" | "test" for every benchmark fact.

    `fact`: each property holds out the same share of its facts (at least one, never all), so every
    property is both taught and tested; the held-out facts are then dealt to validation and test.
    `material`: that share of the materials is held out whole, and the held-out materials (not their
    facts) are dealt to validation and test; every property is still taught, on the other materials.
    """
    if holdout == "material":
        chosen = rng.sample(range(material_count), held_out_count(material_count, benchmark_fraction))
        validation = held_out_count(len(chosen), validation_fraction)
        return {
            (index, prop): ("validation" if position < validation else "test")
            for position, index in enumerate(chosen)
            for prop in PROPERTIES
        }
    held_out: list[tuple[int, str]] = []
    per_property = held_out_count(material_count, benchmark_fraction)
    for prop in PROPERTIES:
        chosen = rng.sample(range(material_count), per_property)
        held_out.extend((index, prop) for index in sorted(chosen))
    rng.shuffle(held_out)
    validation = held_out_count(len(held_out), validation_fraction)
    return {key: ("validation" if position < validation else "test") for position, key in enumerate(held_out)}


@functools.lru_cache(maxsize=4)
def _build(seed: int, material_count: int, benchmark_fraction: float, validation_fraction: float, holdout: str = "fact") -> KnowledgeBase:
    names = InventedNames(random_stream(seed, "facts/names"))
    material_names = [names.material() for _ in range(material_count)]
    organisms = [names.species() for _ in range(material_count)]
    groups_rng = random_stream(seed, "facts/groups")
    groups = [groups_rng.choice(_ORGANISM_GROUPS) for _ in range(material_count)]

    decimals = {prop: _decimals_for(spec, material_count) for prop, spec in _NUMERIC_RANGES.items()}
    scaled = {
        prop: _unique_scaled_values(spec, decimals[prop], material_count, random_stream(seed, f"facts/{prop}"))
        for prop, spec in _NUMERIC_RANGES.items()
    }
    descriptive = {
        "structure": _unique_draws(_draw_structure, material_count, random_stream(seed, "facts/structure"), "structure"),
        "processing": _unique_draws(
            _draw_processing, material_count, random_stream(seed, "facts/processing"), "processing"
        ),
        "source_organism": organisms,
    }
    split = _benchmark_split(material_count, benchmark_fraction, validation_fraction, random_stream(seed, "facts/split"), holdout)

    width = max(5, len(str(material_count - 1)))
    materials = []
    for index in range(material_count):
        material_id = f"mat-{index:0{width}d}"
        facts: dict[str, Fact] = {}
        for prop in PROPERTIES:
            if prop in _NUMERIC_RANGES:
                number = _format_scaled(scaled[prop][index], decimals[prop])
                text, value, unit = f"{number} {UNITS[prop]}", float(number), UNITS[prop]
            else:
                text, value, unit = descriptive[prop][index], None, None
            facts[prop] = Fact(
                id=f"{material_id}/{prop}",
                material_id=material_id,
                material=material_names[index],
                property=prop,
                text=text,
                value=value,
                unit=unit,
                split=split.get((index, prop), "train"),
            )
        materials.append(Material(material_id, material_names[index], groups[index], facts))
    return KnowledgeBase(
        materials=tuple(materials),
        decimals=decimals,
        _scaled_values={prop: frozenset(values) for prop, values in scaled.items()},
        _descriptive_values={prop: frozenset(values) for prop, values in descriptive.items()},
    )


def build_knowledge_base(options: BuiltinCorpusOptions) -> KnowledgeBase:
    """The fact table for `options` (cached: every source of one run shares one table)."""
    return _build(options.seed, options.materials, options.benchmark_fraction, options.validation_fraction, options.holdout)
