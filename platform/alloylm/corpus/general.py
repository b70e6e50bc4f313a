"""The general (non-domain) sources: everyday text and helpful chats, for a tiny base and instruct model.

The text is template prose about invented countries and cities, weather, cooking, everyday facts
and arithmetic; the chats ask for sums, capitals of the invented countries, unit conversions,
comparisons and word definitions. Country facts are shared by the text and the chats, so a model
built from both can answer from what it read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alloylm.corpus.names import InventedNames
from alloylm.corpus.options import BuiltinCorpusOptions
from alloylm.corpus.streams import random_stream

_COUNTRY_COUNT = 24

_CLIMATES = (
    "mild and rainy", "hot and dry", "cold and snowy", "warm and humid", "windy and cool", "sunny and mild",
)
_DISHES = (
    "barley soup", "fried fish", "lentil stew", "apple cake", "rice with beans", "potato pancakes",
    "vegetable pie", "bread with honey", "noodle soup", "roasted peppers",
)
_PEOPLE = (
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo",
    "Maya", "Nora", "Omar", "Paula", "Rosa", "Sam", "Tara", "Victor",
)
_FRUITS = ("apples", "pears", "plums", "oranges", "lemons", "peaches", "cherries", "figs")
_SMALL_NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
_EVERYDAY_FACTS = (
    "A week has seven days.",
    "There are sixty minutes in an hour.",
    "Water freezes when it gets very cold.",
    "Most people sleep at night and work during the day.",
    "Bread is made from flour, water and yeast.",
    "A year has twelve months.",
    "Plants need light and water to grow.",
    "A triangle has three sides.",
    "Rain falls from clouds.",
    "A square has four equal sides.",
    "Many birds fly south when winter comes.",
    "Tea is made by pouring hot water over dried leaves.",
    "The sun rises in the morning and sets in the evening.",
    "A clock shows the time of day.",
    "Children usually go to school on weekdays.",
    "Snow melts when the air gets warmer.",
)
_DEFINITIONS = {
    "kettle": "A kettle is a pot with a spout, used for boiling water.",
    "umbrella": "An umbrella is a folding cover on a stick that keeps the rain off you.",
    "library": "A library is a place where books are kept for people to read or borrow.",
    "bridge": "A bridge is a structure that carries a road or path over a river or a valley.",
    "recipe": "A recipe is a set of instructions for cooking a dish.",
    "calendar": "A calendar is a chart that shows the days, weeks and months of a year.",
    "harbour": "A harbour is a sheltered place on a coast where boats can stay safely.",
    "map": "A map is a drawing of an area that shows where places are.",
    "thermometer": "A thermometer is an instrument that measures temperature.",
    "breakfast": "Breakfast is the first meal of the day.",
    "capital": "The capital of a country is the city where its government sits.",
    "river": "A river is a large stream of water that flows across land into a sea or a lake.",
    "market": "A market is a place where people buy and sell goods.",
    "oven": "An oven is an enclosed box that is heated to bake or roast food.",
    "season": "A season is one of the four parts of the year: spring, summer, autumn and winter.",
    "bicycle": "A bicycle is a vehicle with two wheels that you ride by pushing pedals.",
    "island": "An island is a piece of land with water all around it.",
    "sum": "A sum is the number you get by adding numbers together.",
    "forecast": "A forecast is a statement about what the weather will probably be like.",
    "ladder": "A ladder is a set of steps between two long sides, used for climbing up or down.",
}
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a friendly assistant. Answer clearly and briefly.")
# (unit, smaller unit, how many smaller units in one unit)
_CONVERSIONS = (
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("meters", "centimeters", 100),
    ("days", "hours", 24),
    ("centimeters", "millimeters", 10),
)
_GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi, who are you?", "I am a helpful assistant. Ask me a question and I will do my best to answer it."),
    ("Thank you for your help.", "You are welcome! Let me know if you have another question."),
    ("Good morning!", "Good morning! What would you like to know?"),
    ("Can you help me with a question?", "Of course. What is your question?"),
)


@dataclass(frozen=True)
class _Country:
    name: str
    capital: str
    city: str  # the second city
    river: str
    climate: str
    dish: str


def _world(seed: int) -> tuple[_Country, ...]:
    """The invented countries shared by general text and general chats."""
    rng = random_stream(seed, "general/world")
    names = InventedNames(rng)
    return tuple(
        _Country(
            name=names.country(),
            capital=names.city(),
            city=names.city(),
            river=names.river(),
            climate=rng.choice(_CLIMATES),
            dish=rng.choice(_DISHES),
        )
        for _ in range(_COUNTRY_COUNT)
    )


def _number_word(n: int) -> str:
    return _SMALL_NUMBERS[n] if 0 <= n < len(_SMALL_NUMBERS) else str(n)


# ---------------------------------------------------------------------------------------------
# General text: one topic per document, a few sentences each.
# ---------------------------------------------------------------------------------------------


def _country_text(world: tuple[_Country, ...], rng: random.Random) -> list[str]:
    c = rng.choice(world)
    sentences = [
        rng.choice(("{n} is a country whose capital is {cap}.", "The capital of {n} is {cap}.", "{cap} is the capital city of {n}.")),
        rng.choice(("The river {r} flows through {cap}.", "{cap} lies on the banks of the river {r}.")),
        rng.choice(("{city} is the second largest city of {n}.", "After {cap}, the biggest city in {n} is {city}.")),
        rng.choice(("The weather in {n} is usually {cl}.", "Most of the year, {n} is {cl}.")),
        rng.choice(("A favourite dish in {n} is {d}.", "People in {n} like to eat {d}.")),
    ]
    keep = [sentences[0]] + rng.sample(sentences[1:], rng.randint(2, 4))
    return [s.format(n=c.name, cap=c.capital, city=c.city, r=c.river, cl=c.climate, d=c.dish) for s in keep]


def _weather_text(world: tuple[_Country, ...], rng: random.Random) -> list[str]:
    c, person = rng.choice(world), rng.choice(_PEOPLE)
    city = rng.choice((c.capital, c.city))
    day = rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"))
    morning = rng.choice(("cloudy", "bright", "foggy", "rainy", "windy", "cold"))
    later = rng.choice(
        (
            "By noon the rain had stopped and the sun came out.",
            "In the afternoon a strong wind blew from the sea.",
            "Later it began to snow, and the streets turned white.",
            "The clouds stayed all day, but it did not rain.",
            "At midday it grew warm enough to sit outside.",
        )
    )
    evening = rng.choice(
        (
            "In the evening the sky was clear and full of stars.",
            "By evening everyone was glad to be indoors.",
            "At night the temperature dropped quickly.",
        )
    )
    return [
        f"On {day} morning it was {morning} in {city}.",
        f"{person} looked out of the window and took {rng.choice(('an umbrella', 'a warm coat', 'a hat', 'a scarf'))}.",
        later,
        evening,
    ][: rng.randint(3, 4)]


_COOKING_STEPS = (
    "First, wash and chop the vegetables.",
    "Heat some oil in a large pan.",
    "Add a pinch of salt and a little pepper.",
    "Pour in two cups of water and bring it to the boil.",
    "Stir the pot from time to time.",
    "Let the dish rest for a few minutes before serving.",
)


def _cooking_text(world: tuple[_Country, ...], rng: random.Random) -> list[str]:
    c, person = rng.choice(world), rng.choice(_PEOPLE)
    minutes = rng.choice((10, 15, 20, 25, 30, 40, 45, 60))
    # A sample of the steps, kept in cooking order.
    steps = [_COOKING_STEPS[i] for i in sorted(rng.sample(range(len(_COOKING_STEPS)), 3))]
    return [
        f"{person} wanted to cook {c.dish}, a favourite dish in {c.name}.",
        *steps,
        f"After {minutes} minutes the {c.dish} was ready.",
        rng.choice(("Everyone at the table enjoyed it.", "There was enough left for the next day.", "It smelled wonderful.")),
    ]


def _arithmetic_text(world: tuple[_Country, ...], rng: random.Random) -> list[str]:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        kind = rng.randrange(4)
        if kind == 0:
            sentences.append(f"{_number_word(a).capitalize()} plus {_number_word(b)} equals {_number_word(a + b)}.")
        elif kind == 1:
            sentences.append(f"{a} times {b} is {a * b}.")
        elif kind == 2:
            big, small = max(a, b), min(a, b)
            sentences.append(f"If you take {small} away from {big}, you get {big - small}.")
        else:
            sentences.append(f"Half of {2 * a} is {a}.")
    return sentences


def _everyday_text(world: tuple[_Country, ...], rng: random.Random) -> list[str]:
    return rng.sample(_EVERYDAY_FACTS, rng.randint(3, 5))


def _travel_text(world: tuple[_Country, ...], rng: random.Random) -> list[str]:
    c, person = rng.choice(world), rng.choice(_PEOPLE)
    hours, count = rng.randint(1, 9), rng.randint(2, 12)
    fruit = rng.choice(_FRUITS)
    return [
        f"{person} took the train from {c.city} to {c.capital}.",
        f"The trip took {_number_word(hours)} hours.",
        f"At the market in {c.capital}, {person} bought {count} {fruit}.",
        rng.choice(
            (
                f"In the evening {person} walked along the river {c.river}.",
                f"{person} wrote a postcard home from {c.name}.",
                f"The next morning {person} took the train back to {c.city}.",
            )
        ),
    ]


_TOPICS = (_country_text, _weather_text, _cooking_text, _arithmetic_text, _everyday_text, _travel_text)


def _general_document(world: tuple[_Country, ...], rng: random.Random) -> str:
    sentences = rng.choice(_TOPICS)(world, rng)
    if rng.random() < 0.3:  # some documents span two topics, as real text does
        sentences = sentences + rng.choice(_TOPICS)(world, rng)
    return " ".join(sentences)


def general_text(options: BuiltinCorpusOptions) -> list[dict]:
    """`general-text`: `general_documents` short everyday documents."""
    world = _world(options.seed)
    rng = random_stream(options.seed, "general-text")
    return [{"id": f"general/{i}", "text": _general_document(world, rng)} for i in range(options.general_documents)]


def general_heldout_text(options: BuiltinCorpusOptions) -> list[dict]:
    """`general-heldout-text`: documents of the same kind, none identical to a `general-text` one."""
    world = _world(options.seed)
    seen = {row["text"] for row in general_text(options)}
    rng = random_stream(options.seed, "general-heldout-text")
    rows = []
    for _ in range(100 * options.general_heldout_documents + 10_000):
        if len(rows) == options.general_heldout_documents:
            break
        text = _general_document(world, rng)
        if text not in seen:
            seen.add(text)
            rows.append({"id": f"general-heldout/{len(rows)}", "text": text})
    if len(rows) < options.general_heldout_documents:
        raise RuntimeError(f"found only {len(rows)} general documents unlike every general-text document")
    return rows


# ---------------------------------------------------------------------------------------------
# General chats.
# ---------------------------------------------------------------------------------------------


def _arithmetic_chat(world: tuple[_Country, ...], rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = rng.choice(("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."))
        return question.format(a=a, b=b), f"{a} + {b} = {a + b}."
    if kind == 1:
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        question = rng.choice(("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}."))
        return question.format(a=a, b=b), f"{a} - {b} = {a - b}."
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    question = rng.choice(("What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}."))
    return question.format(a=a, b=b), f"{a} x {b} = {a * b}."


def _capital_chat(world: tuple[_Country, ...], rng: random.Random) -> tuple[str, str]:
    c = rng.choice(world)
    if rng.random() < 0.5:
        question = rng.choice(("What is the capital of {n}?", "Which city is the capital of {n}?", "Name the capital of {n}."))
        return question.format(n=c.name), f"The capital of {c.name} is {c.capital}."
    return f"{c.capital} is the capital of which country?", f"{c.capital} is the capital of {c.name}."


def _conversion_chat(world: tuple[_Country, ...], rng: random.Random) -> tuple[str, str]:
    unit, small, factor = rng.choice(_CONVERSIONS)
    tenths = rng.randint(1, 200) if rng.random() < 0.5 else 10 * rng.randint(1, 20)
    amount = f"{tenths // 10}" if tenths % 10 == 0 else f"{tenths // 10}.{tenths % 10}"
    # Integer arithmetic in tenths, so the answer never shows float noise like 31.200000000000003.
    small_tenths = tenths * factor
    converted = f"{small_tenths // 10}" if small_tenths % 10 == 0 else f"{small_tenths // 10}.{small_tenths % 10}"
    question = rng.choice(
        ("How many {small} are in {amount} {unit}?", "Convert {amount} {unit} to {small}.", "What is {amount} {unit} in {small}?")
    )
    answer = f"{amount} {unit} is {converted} {small}, because one {unit[:-1]} has {factor} {small}."
    return question.format(small=small, amount=amount, unit=unit), answer


def _comparison_chat(world: tuple[_Country, ...], rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(0, 1000), 2)
    question = rng.choice(("Which is larger, {a} or {b}?", "Is {a} bigger than {b}?", "Which number is smaller: {a} or {b}?"))
    question = question.format(a=a, b=b)
    if "smaller" in question:
        return question, f"{min(a, b)} is smaller than {max(a, b)}."
    if question.startswith("Is"):
        return question, (f"Yes, {a} is bigger than {b}." if a > b else f"No, {a} is smaller than {b}.")
    return question, f"{max(a, b)} is larger than {min(a, b)}."


def _definition_chat(world: tuple[_Country, ...], rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(_DEFINITIONS))
    question = rng.choice(("What does the word '{w}' mean?", "What is a {w}?", "Define '{w}'.", "Explain the word {w}."))
    return question.format(w=word), _DEFINITIONS[word]


def _greeting_chat(world: tuple[_Country, ...], rng: random.Random) -> tuple[str, str]:
    return rng.choice(_GREETINGS)


# (task, renderer, weight): sums and capitals dominate because they teach answering from knowledge.
_CHAT_TASKS = (
    ("arithmetic", _arithmetic_chat, 3),
    ("capital", _capital_chat, 3),
    ("unit_conversion", _conversion_chat, 2),
    ("comparison", _comparison_chat, 1),
    ("definition", _definition_chat, 2),
    ("greeting", _greeting_chat, 1),
)


def general_chats(options: BuiltinCorpusOptions) -> list[dict]:
    """`general-chat`: `general_chats` one-turn helpful chats."""
    world = _world(options.seed)
    rng = random_stream(options.seed, "general-chat")
    weights = [weight for _, _, weight in _CHAT_TASKS]
    rows = []
    for i in range(options.general_chats):
        task, render, _ = rng.choices(_CHAT_TASKS, weights=weights)[0]
        user, assistant = render(world, rng)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if rng.random() < options.system_prompt_fraction:
            messages.insert(0, {"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        rows.append({"id": f"general-chat/{i}", "messages": messages, "task": task})
    return rows
