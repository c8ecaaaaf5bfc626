"""Personal facts a user states in plain words and asks about later: the material of memory episodes.

One generator serves training (model/train/memory.py mixes its episodes into real conversations) and
evaluation (bench/recall.py), so both speak the same kinds of facts. What keeps the evaluation honest is the
split: every value and every phrasing belongs to exactly one side, "train" or "eval", decided once.

- Values are split by a SHA-256 of the value (one in four goes to eval), so a name the
  benchmark asks about was never the answer of a training episode, and the split does not move when a pool
  grows. Numbers and dates are drawn from large ranges and split the same way.
- Phrasings (statement and question templates) are listed per kind as train or eval. The benchmark reports
  accuracy on eval values with train phrasings ("seen phrasing") and with eval phrasings ("unseen"): the
  first asks whether the model recalls a value it never saw, the second also whether it understood the
  question rather than a template.

Answers are whole sentences that contain the value verbatim, so a reply is correct when it contains the
value (case-insensitive), whatever else it says.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

Side = Literal["train", "eval"]
SIDES: tuple[Side, ...] = ("train", "eval")

# One value in EVAL_SLOTS goes to eval: enough eval values for a benchmark of a few hundred questions while
# training still sees most of each pool.
EVAL_SLOTS = 4

_NAMES = (
    "Priya Liam Sofia Mateo Aisha Noah Yuki Elena Omar Chloe Ravi Hannah Diego Mei Lucas Amara Felix Nadia "
    "Jonas Leila Tomas Ingrid Kofi Maya Arjun Zoe Hugo Fatima Ethan Clara Malik Iris Sven Rosa Kenji Ana "
    "Dmitri Grace Luca Nora Samir Ella Pablo Hana Viktor Julia Tariq Lily Marco Ava Emil Sara Idris Chen "
    "Olga Leo Rania Oscar Maeve Nikhil Freya Andre Lena Kwame Alice Rafael Tessa Yusuf Mila Anders Carmen "
    "Bruno Daria Ibrahim Lucia Theo Anika Gabriel Esther Hamza Vera Jasper Nina Rohan Stella Mario Ruth "
    "Farid Eva Kai Ines Boris Alma Ivan Selma Louis Paula Hassan Greta Simon Dina Aaron Wanda Isaac Zara"
)
_PETS = (
    "Biscuit Pepper Mochi Ziggy Noodle Pickles Waffles Bruno Luna Oreo Clover Maple Tofu Pumpkin Ginger "
    "Rocket Button Peanut Sprout Pixel Marble Nugget Olive Cosmo Juniper Ruffles Toffee Domino Basil "
    "Sushi Truffle Pippin Zeus Pancake Fudge Hazel Comet Muffin Bingo Socks Churro Kiwi Dumpling Gizmo "
    "Scout Bubbles Paprika Mango Jellybean Nacho Poppy Rascal Snickers Taco Whiskers Yoda Bagel Sprinkles"
)
_CITIES = (
    "Lisbon Denver Osaka Nairobi Toronto Krakow Austin Lyon Seattle Dublin Porto Boston Madrid Helsinki "
    "Chicago Vienna Seoul Prague Oslo Phoenix Cairo Sydney Munich Lima Bogota Hamburg Atlanta Naples "
    "Tokyo Zurich Dallas Athens Melbourne Montreal Budapest Rome Miami Stockholm Mumbai Berlin Nashville "
    "Glasgow Detroit Warsaw Bangkok Manila Houston Vancouver Seville Florence Portland Edinburgh Geneva "
    "Milan Calgary Memphis Brisbane Kyoto Bristol Valencia Riga Tallinn Ottawa Denver Orlando Perth"
)
_JOBS = (
    "nurse,teacher,plumber,pilot,chef,dentist,lawyer,baker,firefighter,librarian,architect,electrician,"
    "farmer,pharmacist,journalist,carpenter,mechanic,accountant,photographer,veterinarian,engineer,"
    "translator,painter,surgeon,florist,barber,tailor,cashier,gardener,waiter,programmer,musician,"
    "scientist,police officer,bus driver,social worker,graphic designer,truck driver,flight attendant,"
    "dancer,lifeguard,welder,butcher,geologist,zookeeper,physiotherapist,bartender,optician,data analyst"
)
_COLORS = (
    "red,blue,green,purple,orange,yellow,teal,pink,turquoise,maroon,lavender,navy blue,gold,silver,"
    "crimson,beige,olive green,magenta,coral,indigo"
)
_FOODS = (
    "pizza,sushi,lasagna,tacos,pancakes,ramen,curry,dumplings,paella,burritos,falafel,risotto,pho,"
    "waffles,nachos,kimchi,goulash,pierogi,hummus,gnocchi,churros,empanadas,bagels,cheesecake,brownies,"
    "meatballs,noodle soup,fried rice,apple pie,guacamole,biryani,moussaka,tiramisu,croissants"
)
_SPORTS = (
    "tennis,soccer,basketball,volleyball,golf,rugby,hockey,cricket,swimming,cycling,badminton,baseball,"
    "skiing,surfing,boxing,climbing,rowing,fencing,table tennis,snowboarding,karate,archery,handball"
)
_INSTRUMENTS = (
    "piano,guitar,violin,drums,cello,flute,trumpet,saxophone,clarinet,harp,ukulele,banjo,accordion,"
    "bass guitar,harmonica,trombone,oboe,mandolin"
)
_MONTHS = "January February March April May June July August September October November December"


@dataclass(frozen=True)
class FactKind:
    """One kind of fact: where its values come from and how it is stated, asked and answered."""

    key: str
    pool: str  # the value pool's name (values_of); also salts the value split
    statements: dict[Side, tuple[str, ...]]  # templates with {v}
    questions: dict[Side, tuple[str, ...]]
    answers: tuple[str, ...]  # replies with {v} for eval phrasings (training answers mirror the statement)


def _kind(
    key: str, pool: str, st: tuple[list[str], list[str]], qu: tuple[list[str], list[str]], an: list[str]
) -> FactKind:
    """A kind from (train, eval) lists of statements and questions, and the answers."""
    return FactKind(key, pool, {"train": tuple(st[0]), "eval": tuple(st[1])},
                    {"train": tuple(qu[0]), "eval": tuple(qu[1])}, tuple(an))  # fmt: skip


KINDS: tuple[FactKind, ...] = (
    _kind(
        "name",
        "names",
        (
            ["My name is {v}.", "I'm {v}, by the way.", "I am {v}.", "I am called {v}.", "i'm {v} btw"],
            ["You can call me {v}.", "People know me as {v}."],
        ),
        (
            ["What is my name?", "Do you remember my name?", "what's my name?", "Who am I?"],
            ["What did I say my name was?", "Can you tell me my name?"],
        ),
        ["Your name is {v}.", "You're {v}!", "You are {v}.", "{v}, of course."],
    ),
    _kind(
        "dog",
        "pets",
        (
            [
                "I have a dog called {v}.",
                "My dog's name is {v}.",
                "I got a puppy named {v}.",
                "my dog is {v}",
            ],
            ["{v} is the name of my dog.", "We just adopted a dog, {v}."],
        ),
        (
            ["What is my dog's name?", "What's my dog called?", "Do you remember my dog's name?"],
            ["What did I say my dog was called?", "Can you tell me my dog's name?"],
        ),
        ["Your dog is called {v}.", "Your dog's name is {v}!", "{v}!", "It's {v}."],
    ),
    _kind(
        "cat",
        "pets",
        (
            ["I have a cat called {v}.", "My cat's name is {v}.", "my cat is named {v}"],
            ["{v} is my cat's name.", "I live with a cat, {v}."],
        ),
        (
            ["What is my cat's name?", "What's my cat called?", "Do you remember my cat's name?"],
            ["What did I say my cat was called?", "Can you tell me my cat's name?"],
        ),
        ["Your cat is called {v}.", "Your cat's name is {v}!", "{v}!", "It's {v}."],
    ),
    _kind(
        "city",
        "cities",
        (
            ["I live in {v}.", "I'm from {v}.", "My home town is {v}.", "i live in {v} now"],
            ["I moved to {v} last year.", "Home for me is {v}."],
        ),
        (
            ["Where do I live?", "Which city am I from?", "What is my home town?"],
            ["What city did I tell you I live in?", "Can you tell me where I live?"],
        ),
        ["You live in {v}.", "You're from {v}!", "{v}.", "In {v}."],
    ),
    _kind(
        "job",
        "jobs",
        (
            ["I work as a {v}.", "I'm a {v}.", "My job? I'm a {v}.", "i work as a {v}"],
            ["For a living I am a {v}.", "I've been a {v} for years."],
        ),
        (
            ["What is my job?", "What do I do for a living?", "What's my job?"],
            ["Can you tell me what I do for work?", "What did I say my job was?"],
        ),
        ["You are a {v}.", "You work as a {v}.", "You're a {v}!", "A {v}."],
    ),
    _kind(
        "number",
        "numbers",
        (
            ["My lucky number is {v}.", "My favorite number is {v}.", "my lucky number is {v}"],
            ["The number I like best is {v}.", "{v} is my lucky number."],
        ),
        (
            ["What is my lucky number?", "What's my favorite number?", "Do you remember my lucky number?"],
            ["Which number did I say I like?", "Can you tell me my lucky number?"],
        ),
        ["Your lucky number is {v}.", "It's {v}.", "{v}!", "Your number is {v}."],
    ),
    _kind(
        "birthday",
        "dates",
        (
            ["My birthday is on {v}.", "I was born on {v}.", "my birthday is {v}"],
            ["I celebrate my birthday on {v}.", "{v} is my birthday."],
        ),
        (
            ["When is my birthday?", "What's my birthday?", "Do you remember my birthday?"],
            ["What date did I say my birthday was?", "Can you tell me when I was born?"],
        ),
        ["Your birthday is on {v}.", "On {v}.", "It's {v}!", "{v}."],
    ),
    _kind(
        "color",
        "colors",
        (
            ["My favorite color is {v}.", "I love the color {v}.", "my favourite colour is {v}"],
            ["The color I like most is {v}.", "{v} is my favorite color."],
        ),
        (
            ["What is my favorite color?", "What's my favourite colour?", "Which color do I love?"],
            ["Can you tell me my favorite color?", "What color did I say I like?"],
        ),
        ["Your favorite color is {v}.", "It's {v}.", "{v}!", "You love {v}."],
    ),
    _kind(
        "food",
        "foods",
        (
            ["My favorite food is {v}.", "I could eat {v} every day.", "i love {v} more than anything"],
            ["Nothing beats {v} for me.", "{v} is my favorite food."],
        ),
        (
            ["What is my favorite food?", "What food do I love?", "What's my favourite food?"],
            ["Can you tell me my favorite food?", "What did I say I could eat every day?"],
        ),
        ["Your favorite food is {v}.", "You love {v}!", "{v}.", "It's {v}."],
    ),
    _kind(
        "sport",
        "sports",
        (
            ["I play {v} every weekend.", "My favorite sport is {v}.", "i'm really into {v}"],
            ["On weekends you'll find me playing {v}.", "{v} is my sport."],
        ),
        (
            ["What sport do I play?", "What is my favorite sport?", "Which sport am I into?"],
            ["Can you tell me my sport?", "What did I say I play on weekends?"],
        ),
        ["You play {v}.", "Your favorite sport is {v}.", "{v}!", "It's {v}."],
    ),
    _kind(
        "instrument",
        "instruments",
        (
            ["I play the {v}.", "I'm learning the {v}.", "my instrument is the {v}"],
            ["I've practised the {v} since I was a kid.", "The {v} is my instrument."],
        ),
        (
            ["What instrument do I play?", "Which instrument am I learning?", "What's my instrument?"],
            ["Can you tell me my instrument?", "What did I say I play?"],
        ),
        ["You play the {v}.", "The {v}!", "It's the {v}.", "You're learning the {v}."],
    ),
)

KIND_KEYS = tuple(kind.key for kind in KINDS)


def _pool(name: str) -> tuple[str, ...]:
    if name == "numbers":
        return tuple(str(n) for n in range(10, 10000))
    if name == "dates":
        return tuple(f"{month} {day}" for month in _MONTHS.split() for day in range(1, 29))
    pools = {"names": _NAMES, "pets": _PETS, "cities": _CITIES, "jobs": _JOBS, "colors": _COLORS,
             "foods": _FOODS, "sports": _SPORTS, "instruments": _INSTRUMENTS}  # fmt: skip
    if name not in pools:
        raise ValueError(f"unknown value pool {name!r}: use one of numbers, dates, {', '.join(pools)}")
    text = pools[name]
    # Multi-word values ("navy blue") are comma-separated; pools of single words are space-separated.
    values = text.split(",") if "," in text else text.split()
    return tuple(dict.fromkeys(values))  # de-duplicated, order kept


def side_of(value: str) -> Side:
    """A value's side, from a SHA-256 of its lowercased spelling: stable across processes, runs and pool
    growth, and the same in every pool ("Bruno" is a name and a pet: one side for both)."""
    digest = hashlib.sha256(value.lower().encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_SLOTS == 0 else "train"


_VALUES: dict[tuple[str, Side], tuple[str, ...]] = {}


def values_of(pool: str, side: Side) -> tuple[str, ...]:
    """The pool's values on one side (cached: the number pool has ten thousand entries)."""
    key = (pool, side)
    if key not in _VALUES:
        _VALUES[key] = tuple(v for v in _pool(pool) if side_of(v) == side)
    return _VALUES[key]


@dataclass(frozen=True)
class Fact:
    """One fact as it appears in a conversation: the user's statement, the later question, the answer."""

    kind: str
    value: str
    statement: str
    question: str
    answer: str


def make_fact(
    rng: np.random.Generator,
    value_side: Side,
    phrasing_side: Side,
    kind: FactKind | None = None,
) -> Fact:
    """Draw a fact: a kind (uniform unless given), a value from `value_side`, templates from `phrasing_side`.

    Training uses ("train", "train") only; the benchmark uses eval values with either phrasing side.
    """
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    values = values_of(kind.pool, value_side)
    value = values[int(rng.integers(len(values)))]
    template = _pick(rng, kind.statements[phrasing_side])
    question = _fill(_pick(rng, kind.questions[phrasing_side]), value)
    # A train-side statement is answered in its own words, turned to the second person ("I have a dog called
    # X." -> "You have a dog called X."): the answer's words then point at the statement, the induction
    # pattern (find the earlier occurrence of these words, copy what followed) that copy spans also train.
    answer = _second_person(template) if phrasing_side == "train" else _pick(rng, kind.answers)
    return Fact(kind.key, value, _fill(template, value), question, _fill(answer, value))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


_SECOND_PERSON = (
    (r"\bI'm\b", "You're"), (r"\bi'm\b", "you're"), (r"\bI am\b", "You are"), (r"\bI was\b", "You were"),
    (r"\bI've\b", "You've"), (r"\bI\b", "You"), (r"\bi\b", "you"), (r"\bMy\b", "Your"), (r"\bmy\b", "your"),
    (r"\bme\b", "you"),
)  # fmt: skip


def _second_person(template: str) -> str:
    """The user's statement as the assistant says it back: first person -> second person."""
    for pattern, replacement in _SECOND_PERSON:
        template = re.sub(pattern, replacement, template)
    return template[:1].upper() + template[1:]


def _fill(template: str, value: str) -> str:
    """The template with its value; a value that opens the sentence ('{v} is my sport.') is capitalised."""
    text = template.format(v=value)
    return text[:1].upper() + text[1:] if template.startswith("{v}") else text


def reply_has_value(reply: str, value: str) -> bool:
    """The recall criterion: the reply contains the value as whole words, ignoring case ("Ana" is not
    found in "banana", "12" not in "123")."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply, flags=re.IGNORECASE) is not None
