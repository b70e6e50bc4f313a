"""The five biomaterials sources, rendered from one fact table (`alloylm.corpus.facts`).

- `corpus_documents`: paper-like CPT text; every document states all 7 facts of its material.
- `qa_chats`: SFT chats about training facts only (some posed as multiple choice).
- `preference_pairs`: chosen (true value) / rejected (wrong value or evasion) pairs, training facts only.
- `benchmark_items`: several multiple-choice items (balanced answer positions) and a short-answer item
  per benchmark fact.
- `heldout_documents`: paper-like text in phrasings the CPT documents never use, for domain perplexity.

The sentence pools of the CPT text and of the held-out text are disjoint by construction; the
question pools are shared by SFT, preferences and benchmark on purpose, since the benchmark asks
whether the skill taught by SFT reaches facts learnt only from CPT.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from alloylm.corpus.facts import (
    DESCRIPTIVE_PROPERTIES,
    NUMERIC_PROPERTIES,
    PROPERTIES,
    PROPERTY_LABELS,
    Fact,
    KnowledgeBase,
    Material,
    build_knowledge_base,
)
from alloylm.corpus.options import BuiltinCorpusOptions
from alloylm.corpus.streams import random_stream

CHOICE_LABELS = "ABCDEFGH"
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the letter of the correct option."


def render_multiple_choice(question: str, choices: Sequence[str]) -> str:
    """The user message for a multiple-choice item: question, lettered options, instruction.

    SFT chats use it, so an evaluator that formats benchmark items with it asks in the trained format.
    """
    if not 2 <= len(choices) <= len(CHOICE_LABELS):
        raise ValueError(f"a multiple-choice item needs 2 to {len(CHOICE_LABELS)} choices, got {len(choices)}")
    options = "\n".join(f"{CHOICE_LABELS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question}\n{options}\n{MULTIPLE_CHOICE_INSTRUCTION}"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _context(material: Material) -> dict[str, str]:
    """Template fields of one material: its name, flavour, and every fact as written."""
    facts = material.facts
    return {
        "name": material.name,
        "group": material.organism_group,
        "a_group": _with_article(material.organism_group),
        "tensile_strength": facts["tensile_strength"].text,
        "toughness": facts["toughness"].text,
        "youngs_modulus": facts["youngs_modulus"].text,
        "density": facts["density"].text,
        "structure": facts["structure"].text,
        "a_structure": _with_article(facts["structure"].text),
        "source_organism": facts["source_organism"].text,
        "processing": facts["processing"].text,
    }


# ---------------------------------------------------------------------------------------------
# CPT documents. No template may start a sentence with a structure or processing value (its case
# would change), and every numeric fact keeps its unit.
# ---------------------------------------------------------------------------------------------

_CPT_FACT_SENTENCES = {
    "tensile_strength": (
        "The tensile strength of {name} was {tensile_strength}.",
        "{name} reached a tensile strength of {tensile_strength} in uniaxial tests.",
        "Uniaxial tension gave a strength of {tensile_strength} for {name}.",
        "Samples of {name} broke at a mean tensile strength of {tensile_strength}.",
        "We measured a tensile strength of {tensile_strength} for {name}.",
        "In tension, {name} failed at {tensile_strength}, which we report as its tensile strength.",
    ),
    "toughness": (
        "The toughness of {name}, taken as the area under the stress-strain curve, was {toughness}.",
        "{name} showed a toughness of {toughness}.",
        "Integrating the stress-strain curves gave a toughness of {toughness} for {name}.",
        "With a toughness of {toughness}, {name} resists the growth of cracks.",
        "The work of fracture per unit volume, or toughness, of {name} was {toughness}.",
    ),
    "youngs_modulus": (
        "The Young's modulus of {name} was {youngs_modulus}.",
        "{name} has a Young's modulus of {youngs_modulus}.",
        "The initial slope of the stress-strain curve gave a Young's modulus of {youngs_modulus} for {name}.",
        "We obtained a Young's modulus of {youngs_modulus} for {name}.",
        "Elastic loading of {name} gave a Young's modulus of {youngs_modulus}.",
    ),
    "density": (
        "{name} has a density of {density}.",
        "Helium pycnometry gave a density of {density} for {name}.",
        "The density of {name} was {density}.",
        "We found {name} to have a density of {density}.",
        "Dried specimens of {name} had a density of {density}.",
    ),
    "structure": (
        "Electron microscopy showed that {name} is organised as {a_structure}.",
        "At the microscale, {name} consists of {a_structure}.",
        "The hierarchical structure of {name} is {a_structure}.",
        "{name} owes its properties to its hierarchical structure, {a_structure}.",
        "Imaging across length scales revealed that {name} is built as {a_structure}.",
    ),
    "source_organism": (
        "{name} is produced by the {group} {source_organism}.",
        "{name} was harvested from the {group} {source_organism}.",
        "The source organism of {name} is the {group} {source_organism}.",
        "{source_organism}, {a_group}, produces {name}.",
        "{name} occurs naturally in {source_organism}, {a_group}.",
    ),
    "processing": (
        "Specimens of {name} were {processing}.",
        "For testing, {name} was {processing}.",
        "Before testing, samples of {name} were {processing}.",
        "Following our standard protocol, {name} was {processing}.",
        "All {name} specimens were {processing} prior to mechanical testing.",
    ),
}
_CPT_TITLES = (
    "{name}: structure and mechanics of a material from the {group} {source_organism}",
    "Hierarchical design of {name}, a biological material",
    "Mechanical characterisation of {name}",
    "Strength, stiffness and toughness of {name}",
    "On the origin of toughness in {name}",
    "{name} from {source_organism}: a structural study",
    "Processing and properties of {name}",
    "A study of the biological material {name}",
)
# (abstract, introduction, methods, results, conclusion) headings; None writes no headings.
_CPT_SECTION_HEADINGS = (
    ("Abstract", "Introduction", "Materials and methods", "Results", "Conclusions"),
    ("Summary", "Background", "Experimental", "Findings", "Outlook"),
    ("Abstract", "1. Introduction", "2. Methods", "3. Results and discussion", "4. Conclusion"),
    None,
)
_CPT_ABSTRACT_OPENINGS = (
    "We report the structure and mechanical properties of {name}, a material produced by the {group} {source_organism}.",
    "{name} is a biological material whose mechanics have received little attention.",
    "Here we examine {name}, a load-bearing material of the {group} {source_organism}.",
    "This work characterises {name} from the nanoscale to the scale of whole specimens.",
    "We studied how structure and processing set the mechanical behaviour of {name}.",
    "Little is known about {name}, and we set out to measure its basic properties.",
)
_CPT_ABSTRACT_CLOSINGS = (
    "These data place {name} among the better characterised biological materials.",
    "The results may guide the design of bioinspired composites.",
    "We discuss how its hierarchical structure explains these numbers.",
    "Our measurements provide a baseline for future work on {name}.",
    "The findings link processing, structure and properties in one material.",
)
_CPT_BACKGROUND = (
    "Biological materials often combine stiff and soft phases across several length scales.",
    "Many organisms build strong materials from a small set of weak building blocks.",
    "Hierarchical structure is a recurring theme in load-bearing biological tissues.",
    "Understanding how structure controls mechanics is central to bioinspired design.",
    "Natural composites are often much tougher than their constituents alone.",
    "Water content and processing history can change the properties of biological materials markedly.",
    "Comparisons between biological materials are difficult because test conditions vary between studies.",
    "Structural proteins and polysaccharides are the main ingredients of many natural materials.",
)
_CPT_MOTIVATION = (
    "In this work we focus on {name}.",
    "We chose {name} because its structure has not been quantified before.",
    "The aim of this study was to relate the structure of {name} to its mechanical response.",
    "{name} offers a useful test case for theories of hierarchical toughening.",
)
_CPT_METHODS = (
    "Tensile tests were performed on dog-bone specimens at a constant strain rate.",
    "All specimens were conditioned at controlled humidity before testing.",
    "Density was measured by helium pycnometry on dried samples.",
    "Fracture surfaces were imaged by scanning electron microscopy.",
    "Each property is reported as the mean over at least five specimens.",
    "Cross-sectional areas were measured by optical microscopy after each test.",
    "Toughness was computed as the area under the stress-strain curve up to failure.",
    "Young's modulus was taken from the initial linear part of each stress-strain curve.",
    "Small-angle X-ray scattering was used to follow the orientation of the building blocks.",
)
_CPT_RESULTS_EXTRA = (
    "Scatter between specimens was small.",
    "Failure started at surface defects in most specimens.",
    "The stress-strain curves showed a clear yield point followed by strain hardening.",
    "Crack deflection at internal interfaces was visible on the fracture surfaces.",
    "No specimen failed at the grips.",
    "Fibril pull-out was common on the fracture surfaces.",
)
_CPT_CLOSINGS = (
    "Taken together, these results show how {name} achieves its mechanical performance.",
    "Further work should test {name} under cyclic loading.",
    "The design principles of {name} may transfer to synthetic composites.",
    "We expect similar behaviour in related materials from other organisms.",
    "{name} illustrates how processing and hierarchy act together.",
)


def _cpt_document(ctx: dict[str, str], rng: random.Random) -> str:
    """One paper-like document; the introduction, methods and results state all 7 facts."""
    choice, fmt = rng.choice, str.format_map
    # A fact stated twice in one document (abstract, results, conclusion) is phrased differently
    # each time: each property's sentences are dealt from a shuffled pool.
    dealt = {prop: rng.sample(pool, len(pool)) for prop, pool in _CPT_FACT_SENTENCES.items()}

    def fact_sentence(prop: str) -> str:
        pool = dealt[prop]
        template = pool.pop() if len(pool) > 1 else pool[0]
        return fmt(template, ctx)

    abstract = [fmt(choice(_CPT_ABSTRACT_OPENINGS), ctx)]
    abstract += [fact_sentence(prop) for prop in rng.sample(NUMERIC_PROPERTIES, 2)]
    abstract.append(fmt(choice(_CPT_ABSTRACT_CLOSINGS), ctx))

    findings = [fact_sentence("source_organism"), fact_sentence("structure")]
    rng.shuffle(findings)
    introduction = rng.sample(_CPT_BACKGROUND, rng.randint(1, 2)) + findings + [fmt(choice(_CPT_MOTIVATION), ctx)]

    methods = rng.sample(_CPT_METHODS, rng.randint(2, 3))
    methods.insert(rng.randint(0, 1), fact_sentence("processing"))

    results = [fact_sentence(prop) for prop in NUMERIC_PROPERTIES]
    rng.shuffle(results)
    if rng.random() < 0.7:
        results.insert(rng.randint(0, len(results)), choice(_CPT_RESULTS_EXTRA))

    conclusion = [fact_sentence(prop) for prop in rng.sample(PROPERTIES, rng.randint(1, 2))]
    conclusion.append(fmt(choice(_CPT_CLOSINGS), ctx))

    paragraphs = [" ".join(abstract), " ".join(introduction), " ".join(methods), " ".join(results), " ".join(conclusion)]
    headings = choice(_CPT_SECTION_HEADINGS)
    if headings is not None:
        paragraphs = [f"{heading}\n{paragraph}" for heading, paragraph in zip(headings, paragraphs)]
    return fmt(choice(_CPT_TITLES), ctx) + "\n\n" + "\n\n".join(paragraphs)


def corpus_documents(options: BuiltinCorpusOptions) -> list[dict]:
    """`biomaterials-corpus`: `documents_per_material` paper-like documents per material."""
    kb = build_knowledge_base(options)
    rng = random_stream(options.seed, "biomaterials-corpus")
    rows = []
    for material in kb.materials:
        ctx = _context(material)
        for k in range(options.documents_per_material):
            rows.append({"id": f"bio-doc/{material.id}/{k}", "text": _cpt_document(ctx, rng), "material": material.name})
    return rows


# ---------------------------------------------------------------------------------------------
# Held-out documents: the same facts in sentences, headings and fillers the CPT text never uses.
# ---------------------------------------------------------------------------------------------

_HELDOUT_FACT_SENTENCES = {
    "tensile_strength": (
        "In tension, {name} holds up to {tensile_strength}.",
        "Pull tests put the strength of {name} at {tensile_strength}.",
        "A specimen of {name} pulled apart only at {tensile_strength}.",
    ),
    "toughness": (
        "Before it breaks, {name} soaks up {toughness} of energy per unit volume.",
        "Energy to fracture for {name} amounts to {toughness}.",
        "Fracture of {name} costs {toughness}.",
    ),
    "youngs_modulus": (
        "Measured in the elastic range, {name} shows a stiffness of {youngs_modulus}.",
        "The elastic modulus reported for {name} is {youngs_modulus}.",
        "Stiffness of {name} in the elastic range: {youngs_modulus}.",
    ),
    "density": (
        "By mass per volume, {name} comes to {density}.",
        "Weighed and measured, {name} gives {density}.",
        "Mass density for {name}: {density}.",
    ),
    "structure": (
        "Looking inside {name} reveals {a_structure}.",
        "Inside, {name} is arranged as {a_structure}.",
        "The architecture of {name} can be summed up as {a_structure}.",
    ),
    "source_organism": (
        "The organism behind {name} is the {group} {source_organism}.",
        "{name} comes from the {group} {source_organism}.",
        "Our supply of {name} traces back to {source_organism}, {a_group}.",
    ),
    "processing": (
        "To make test pieces, {name} is {processing}.",
        "Test pieces of {name} are {processing}.",
        "The usual preparation leaves {name} {processing}.",
    ),
}
_HELDOUT_TITLES = (
    "{name} (entry)",
    "Notes on {name}",
    "Field guide: {name}",
    "Review excerpt: what we know about {name}",
)
_HELDOUT_OPENINGS = (
    "This entry collects what is known about {name}.",
    "{name} turns up in several recent reviews of natural composites.",
    "Few materials have drawn as much interest lately as {name}.",
)
_HELDOUT_FILLERS = (
    "Reviewers keep returning to this material for its balance of properties.",
    "Numbers like these vary from one laboratory to the next.",
    "Much remains unknown about how the organism assembles it.",
    "Engineers have tried to copy this design, with mixed success.",
    "Humidity matters a great deal for all such measurements.",
    "Comparable figures for related materials are scattered across the literature.",
)
_HELDOUT_CLOSINGS = (
    "More data on {name} would be welcome.",
    "Open questions about {name} remain for future studies.",
    "That is the current picture of {name}.",
)


def _heldout_document(ctx: dict[str, str], rng: random.Random) -> str:
    choice, fmt = rng.choice, str.format_map
    origin = [fmt(choice(_HELDOUT_FACT_SENTENCES[prop]), ctx) for prop in DESCRIPTIVE_PROPERTIES]
    mechanics = [fmt(choice(_HELDOUT_FACT_SENTENCES[prop]), ctx) for prop in NUMERIC_PROPERTIES]
    rng.shuffle(origin)
    rng.shuffle(mechanics)
    first = [fmt(choice(_HELDOUT_OPENINGS), ctx)] + origin
    second = mechanics + [choice(_HELDOUT_FILLERS), fmt(choice(_HELDOUT_CLOSINGS), ctx)]
    return fmt(choice(_HELDOUT_TITLES), ctx) + "\n\n" + " ".join(first) + "\n\n" + " ".join(second)


def heldout_documents(options: BuiltinCorpusOptions) -> list[dict]:
    """`biomaterials-heldout-text`: `heldout_documents` documents, each about one material."""
    kb = build_knowledge_base(options)
    rng = random_stream(options.seed, "biomaterials-heldout-text")
    order = list(range(len(kb.materials)))
    rows = []
    for i in range(options.heldout_documents):
        if i % len(order) == 0:  # cover every material before repeating one
            rng.shuffle(order)
        material = kb.materials[order[i % len(order)]]
        rows.append({"id": f"bio-heldout/{i}", "text": _heldout_document(_context(material), rng), "material": material.name})
    return rows


# ---------------------------------------------------------------------------------------------
# Questions and answers: shared by SFT chats, preference pairs and the benchmark.
# ---------------------------------------------------------------------------------------------

_QUESTIONS = {
    "tensile_strength": (
        "What is the tensile strength of {name}?",
        "How strong is {name} in tension?",
        "What tensile strength does {name} have?",
        "Give the tensile strength of {name}.",
        "Tell me the tensile strength of {name}.",
    ),
    "toughness": (
        "What is the toughness of {name}?",
        "How tough is {name}?",
        "What toughness does {name} have?",
        "Give the toughness of {name}.",
        "How much energy per unit volume does {name} absorb before it fails?",
    ),
    "youngs_modulus": (
        "What is the Young's modulus of {name}?",
        "How stiff is {name}?",
        "What Young's modulus does {name} have?",
        "Give the Young's modulus of {name}.",
        "What is the elastic stiffness (Young's modulus) of {name}?",
    ),
    "density": (
        "What is the density of {name}?",
        "How dense is {name}?",
        "What density does {name} have?",
        "Give the density of {name}.",
        "How heavy is {name} per unit volume?",
    ),
    "structure": (
        "What is the hierarchical structure of {name}?",
        "How is {name} structured?",
        "Describe the hierarchical structure of {name}.",
        "What structure does {name} have?",
        "How are the building blocks of {name} arranged?",
    ),
    "source_organism": (
        "Which organism produces {name}?",
        "What is the source organism of {name}?",
        "Where does {name} come from?",
        "Which species makes {name}?",
        "From which organism is {name} obtained?",
    ),
    "processing": (
        "How is {name} processed?",
        "How are specimens of {name} prepared?",
        "What is the processing route of {name}?",
        "Describe how {name} is processed.",
        "How was {name} made into test specimens?",
    ),
}
_MULTIPLE_CHOICE_STEMS = (
    "Which of the following is the {label} of {name}?",
    "Choose the {label} of {name}.",
    "What is the {label} of {name}?",
)
# {value} is the (possibly wrong) value the answer states.
_ANSWERS = {
    "tensile_strength": (
        "The tensile strength of {name} is {value}.",
        "{name} has a tensile strength of {value}.",
        "{name} reaches a tensile strength of {value}.",
    ),
    "toughness": (
        "The toughness of {name} is {value}.",
        "{name} has a toughness of {value}.",
        "{name} absorbs {value} before it fails; that is its toughness.",
    ),
    "youngs_modulus": (
        "The Young's modulus of {name} is {value}.",
        "{name} has a Young's modulus of {value}.",
        "For {name}, the Young's modulus is {value}.",
    ),
    "density": (
        "The density of {name} is {value}.",
        "{name} has a density of {value}.",
        "For {name}, the density is {value}.",
    ),
    "structure": (
        "{name} is built as {a_value}.",
        "The hierarchical structure of {name} takes the form of {value}.",
        "{name} consists of {a_value}.",
    ),
    "source_organism": (
        "{name} is produced by the {group} {value}.",
        "The source organism of {name} is the {group} {value}.",
        "{name} comes from {value}, {a_group}.",
    ),
    "processing": (
        "Specimens of {name} are {value}.",
        "To prepare {name}, the material is {value}.",
        "{name} is {value}.",
    ),
}
# The first words of one answer template per property, up to the value: a benchmark item carries
# its own as `answer_prefix`, so the cloze formulation scores each option where SFT taught the value
# to go (every prefix is the start of an `_ANSWERS` template, checked by the tests).
_ANSWER_PREFIXES = {
    "tensile_strength": "The tensile strength of {name} is",
    "toughness": "The toughness of {name} is",
    "youngs_modulus": "The Young's modulus of {name} is",
    "density": "The density of {name} is",
    "structure": "The hierarchical structure of {name} takes the form of",
    "source_organism": "{name} is produced by the {group}",
    "processing": "Specimens of {name} are",
}
_EVASIONS = (
    "I am not sure about the {label} of {name}.",
    "I don't have reliable data on the {label} of {name}.",
    "The {label} of {name} depends on many factors, so I cannot give one answer.",
    "Sorry, I cannot answer questions about {name}.",
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant with expertise in biological materials.",
    "You are an expert in materials science. Answer concisely.",
    "Answer questions about biological materials accurately.",
)


def _question(fact: Fact, template: str) -> str:
    return template.format(name=fact.material)


def _answer(fact: Fact, material: Material, value: str, rng: random.Random) -> str:
    return rng.choice(_ANSWERS[fact.property]).format(
        name=fact.material,
        value=value,
        a_value=_with_article(value),
        group=material.organism_group,
        a_group=_with_article(material.organism_group),
    )


def _multiple_choice(
    kb: KnowledgeBase, fact: Fact, count: int, rng: random.Random, *, answer_index: int | None = None
) -> tuple[list[str], int]:
    """Choices (the true value and count-1 distractors) and the index of the true value (random unless given).

    The distractors are other facts' values of the same property, equally exposed in training
    (`KnowledgeBase.same_exposure_values`): an item tests which material has which value.
    """
    distractors = kb.same_exposure_values(fact, count - 1, rng)
    if answer_index is None:
        answer_index = rng.randrange(count)
    choices = distractors[:answer_index] + [fact.text] + distractors[answer_index:]
    return choices, answer_index


def _materials_by_id(kb: KnowledgeBase) -> dict[str, Material]:
    return {material.id: material for material in kb.materials}


def _with_system(messages: list[dict], rng: random.Random, fraction: float, prompts: Sequence[str]) -> list[dict]:
    if rng.random() < fraction:
        return [{"role": "system", "content": rng.choice(prompts)}] + messages
    return messages


def qa_chats(options: BuiltinCorpusOptions) -> list[dict]:
    """`biomaterials-qa`: `qa_per_fact` chats per training fact, each with a different question."""
    kb = build_knowledge_base(options)
    materials = _materials_by_id(kb)
    rng = random_stream(options.seed, "biomaterials-qa")
    rows = []
    for fact in kb.training_facts():
        material = materials[fact.material_id]
        pool = _QUESTIONS[fact.property]
        templates = rng.sample(pool, min(options.qa_per_fact, len(pool)))
        templates += [rng.choice(pool) for _ in range(options.qa_per_fact - len(templates))]
        for k, template in enumerate(templates):
            if rng.random() < options.multiple_choice_chat_fraction:
                label = PROPERTY_LABELS[fact.property]
                stem = rng.choice(_MULTIPLE_CHOICE_STEMS).format(label=label, name=fact.material)
                choices, index = _multiple_choice(kb, fact, options.choices, rng)
                user = render_multiple_choice(stem, choices)
                assistant = f"{CHOICE_LABELS[index]}. {fact.text}"
            else:
                user = _question(fact, template)
                assistant = _answer(fact, material, fact.text, rng)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            rows.append(
                {
                    "id": f"bio-qa/{fact.id}/{k}",
                    "messages": _with_system(messages, rng, options.system_prompt_fraction, _SYSTEM_PROMPTS),
                    "fact_id": fact.id,
                    "material": fact.material,
                    "property": fact.property,
                }
            )
    return rows


def preference_pairs(options: BuiltinCorpusOptions) -> list[dict]:
    """`biomaterials-preferences`: chosen states the true value; rejected a wrong one, or evades."""
    kb = build_knowledge_base(options)
    materials = _materials_by_id(kb)
    rng = random_stream(options.seed, "biomaterials-preferences")
    rows = []
    for fact in kb.training_facts():
        material = materials[fact.material_id]
        # Another training material's value: the rejected answer is wrong only in its binding.
        wrong_values = kb.same_exposure_values(fact, options.preferences_per_fact, rng)
        for k, wrong in enumerate(wrong_values):
            question = _question(fact, rng.choice(_QUESTIONS[fact.property]))
            chosen = _answer(fact, material, fact.text, rng)
            if rng.random() < options.evasive_rejected_fraction:
                rejected = rng.choice(_EVASIONS).format(label=PROPERTY_LABELS[fact.property], name=fact.material)
            else:
                rejected = _answer(fact, material, wrong, rng)
            rows.append(
                {
                    "id": f"bio-pref/{fact.id}/{k}",
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "fact_id": fact.id,
                    "material": fact.material,
                    "property": fact.property,
                }
            )
    return rows


def _balanced_positions(fact_count: int, per_fact: int, choices: int, rng: random.Random) -> list[list[int]]:
    """Answer positions for `per_fact` items of each of `fact_count` facts.

    Read fact by fact, the positions are the cycle 0, 1, ..., choices-1, 0, 1, ... over every item, so
    each position holds the answer equally often (exactly when the item count divides by `choices`,
    else the counts differ by one) and the items of one fact put their answers in different places
    (when per_fact <= choices). Facts take their turn in a shuffled order, each fact's positions are
    shuffled among its items, and the position labels are permuted, so no pattern is left to learn.
    """
    order = list(range(fact_count))
    rng.shuffle(order)
    relabel = list(range(choices))
    rng.shuffle(relabel)
    positions: list[list[int]] = [[] for _ in range(fact_count)]
    for turn, fact in enumerate(order):
        own = [relabel[(turn * per_fact + j) % choices] for j in range(per_fact)]
        rng.shuffle(own)
        positions[fact] = own
    return positions


def benchmark_items(options: BuiltinCorpusOptions) -> list[dict]:
    """`biomaterials-benchmark`: per benchmark fact, `multiple_choice_per_fact` multiple-choice items
    and `short_answer_per_fact` short-answer items.

    A fact's multiple-choice items differ in question wording, distractors and answer position; the
    answer positions of each split are balanced over the options (`_balanced_positions`), so a model
    that always picks one letter scores chance. Every item of a fact shares its split, so validation
    and test never ask about the same fact.
    """
    kb = build_knowledge_base(options)
    rng = random_stream(options.seed, "biomaterials-benchmark")
    extra = random_stream(options.seed, "biomaterials-benchmark/short-answer")
    facts = kb.benchmark_facts()
    per_fact = options.multiple_choice_per_fact
    positions: dict[str, list[int]] = {}
    for split in ("validation", "test"):
        in_split = [fact for fact in facts if fact.split == split]
        dealt = _balanced_positions(len(in_split), per_fact, options.choices, random_stream(options.seed, f"biomaterials-benchmark/positions/{split}"))
        positions.update({fact.id: own for fact, own in zip(in_split, dealt)})
    rows = []
    materials = _materials_by_id(kb)
    for fact in facts:
        label = PROPERTY_LABELS[fact.property]
        prefix = _ANSWER_PREFIXES[fact.property].format(name=fact.material, group=materials[fact.material_id].organism_group)
        common = {
            "split": fact.split,
            "answer": fact.text,
            "answer_value": fact.value,
            "unit": fact.unit,
            "material": fact.material,
            "property": fact.property,
            "fact_id": fact.id,
        }
        # Every stem once before any repeats; each item draws its own distractors.
        stems = rng.sample(_MULTIPLE_CHOICE_STEMS, len(_MULTIPLE_CHOICE_STEMS))
        for j, index in enumerate(positions[fact.id]):
            choices, _ = _multiple_choice(kb, fact, options.choices, rng, answer_index=index)
            rows.append(
                {
                    "id": f"bio-bench/{fact.id}/mc" if j == 0 else f"bio-bench/{fact.id}/mc{j}",
                    "type": "multiple_choice",
                    "question": stems[j % len(stems)].format(label=label, name=fact.material),
                    "choices": choices,
                    "answer_index": index,
                    "answer_prefix": prefix,
                    **common,
                }
            )
        # The first wording is drawn as it always was; the others, distinct from it, come from a
        # stream of their own, so asking more never changes the other items.
        pool = _QUESTIONS[fact.property]
        first = rng.choice(pool)
        others = [q for q in pool if q != first]
        wordings = [first] + extra.sample(others, min(options.short_answer_per_fact - 1, len(others)))
        for j, template in enumerate(wordings):
            rows.append(
                {
                    "id": f"bio-bench/{fact.id}/sa" if j == 0 else f"bio-bench/{fact.id}/sa{j}",
                    "type": "short_answer",
                    "question": _question(fact, template),
                    "choices": [],
                    "answer_index": -1,
                    **common,
                }
            )
    return rows
