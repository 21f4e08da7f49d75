"""The lesson's three datasets: completing a telegram in telegram style, summarising a news item in one sentence, and
extracting the people, organizations and locations a text names.

Why generated rather than downloaded: the lesson runs offline and nothing may come from a model or data hub. Every
example is a template filled by Faker (PyPI `faker`, pinned in pyproject.toml's `test` extra, since another Faker
version may fill the same seed differently) from a seeded generator, so one seed gives the same examples on every
machine, and the template gives each example its reference answer: the rest of the telegram, the summary, the list
of entities.

The held-out split shares the templates with the training split, never a prompt: its names, places, companies and
numbers are new combinations, so a score on it measures whether an adapter learned the task rather than examples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from string import Formatter
from typing import Annotated

from faker import Faker
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

TASKS = ("style", "summary", "entities")
ENTITY_TYPES = ("person", "organization", "location")
HELDOUT_SIZE = 100  # examples per task held out from training; a scoring run may use fewer


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str  # what the model should write after the prompt, with the space that follows the prompt, if any


def split(task: str, train_size: int, heldout_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) for `task`, with no prompt in both; the same arguments always give the same lists."""
    examples = build(task, train_size + heldout_size, seed)
    return examples[heldout_size:], examples[:heldout_size]


def build(task: str, count: int, seed: int) -> list[Example]:
    """`count` examples of `task` with distinct prompts."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; tasks: {list(TASKS)}")
    fake = Faker("en_US")
    fake.seed_instance(seed)
    examples: dict[str, Example] = {}
    while len(examples) < count:
        example = _BUILDERS[task](fake)
        examples.setdefault(example.prompt, example)
    return list(examples.values())


# ------------------------------------------------------------------------------------------------ style: telegrams

_NUMBER_WORDS = ("TWO", "THREE", "FOUR", "FIVE", "SIX", "TEN", "TWELVE", "TWENTY", "FIFTY", "HUNDRED")
_TELEGRAM_CLAUSES = (
    "ARRIVED {city} {weekday}",
    "WEATHER {weather}",
    "MEETING WITH {surname} {outcome}",
    "SEND {number} POUNDS CARE OF {firm}",
    "SHIP DELAYED {number} DAYS",
    "{first} SAFE AND WELL",
    "CONTRACT WITH {firm} SIGNED",
    "RETURNING {month} {weekday}",
    "LETTER FOLLOWS",
    "NO NEWS OF {first}",
    "{goods} SCARCE PRICES HIGH",
    "CONGRATULATIONS ON {occasion}",
    "WIRE REPLY {firm} {city}",
    "TRAIN LEAVES {number} OCLOCK",
    "MOTHER ASKS FOR YOU",
    "HOTEL {surname} FULL TRY {city}",
    "{first} MARRIED {weekday}",
    "ROADS CLOSED BY SNOW",
    "OFFER ACCEPTED",
    "DO NOT SELL {goods}",
    "MISSED CONNECTION AT {city}",
    "{surname} ASKS {number} POUNDS",
)
_SIGN_OFFS = ("LOVE {first}", "REGARDS {surname}", "YOURS {surname}")
_WORD = r"[A-Z'\-]+"
_TELEGRAM_CONTINUATION = re.compile(rf"(?:{_WORD}(?: {_WORD}){{0,7}} STOP )+(?:LOVE|REGARDS|YOURS) {_WORD}")


def in_telegram_style(continuation: str) -> bool:
    """Whether a continuation keeps the telegram's conventions: capitals only, no digits or punctuation, short clauses
    each closed by STOP, and a one-word sign-off."""
    return _TELEGRAM_CONTINUATION.fullmatch(continuation.strip()) is not None


def _telegram(fake: Faker) -> Example:
    rng = fake.random
    values = {
        "city": _telegram_word(fake.city()),
        "weekday": fake.day_of_week().upper(),
        "month": fake.month_name().upper(),
        "surname": _telegram_word(fake.last_name()),
        "first": _telegram_word(fake.first_name()),
        "firm": f"{_telegram_word(fake.last_name())} {rng.choice(('BROTHERS', 'AND SONS', 'COMPANY', 'LIMITED'))}",
        "number": rng.choice(_NUMBER_WORDS),
        "weather": rng.choice(("FINE", "COLD", "STORMY", "HOT", "WET")),
        "outcome": rng.choice(("POSTPONED", "CONFIRMED", "CANCELLED", "A SUCCESS")),
        "goods": rng.choice(("COAL", "WHEAT", "COTTON", "RUBBER", "TEA", "COPPER")),
        "occasion": rng.choice(("THE BABY", "YOUR PROMOTION", "THE WEDDING", "THE ELECTION")),
    }
    clauses = [clause.format(**values) for clause in rng.sample(_TELEGRAM_CLAUSES, rng.randint(4, 6))]
    sign_off = rng.choice(_SIGN_OFFS).format(**values)
    head, rest = clauses[:2], clauses[2:]
    return Example(" STOP ".join(head) + " STOP", "".join(f" {clause} STOP" for clause in rest) + f" {sign_off}")


def _telegram_word(name: str) -> str:
    """A Faker name as a telegram writes it: capitals, and nothing a telegraph did not send."""
    return re.sub(r"[^A-Z' \-]", "", name.upper()).strip()


# ------------------------------------------------------------------------------------------------ summary: news

_SUMMARY_INSTRUCTION = "Summarize the article in one sentence."


def _news(fake: Faker) -> Example:
    rng = fake.random
    company = fake.company()
    lead, details, summary = rng.choice(_NEWS_EVENTS)(fake, company)
    background = [
        f"{company} was founded in {fake.random_int(1950, 2015)} and employs about {fake.random_int(2, 90) * 100:,} "
        "people.",
        f'"We are {rng.choice(("pleased", "confident", "excited", "proud"))} about what comes next," said '
        f"{fake.first_name()} {fake.last_name()}, a spokesperson for the company.",
        f"Shares of {company} {rng.choice(('rose', 'fell'))} {fake.random_int(1, 9)}% in early trading.",
        f"The news was first reported by the {fake.city()} {rng.choice(('Herald', 'Times', 'Post', 'Gazette'))}.",
    ]
    body = rng.sample(details + background, rng.randint(2, 3))
    article = " ".join([lead, *body])
    return Example(f"{_SUMMARY_INSTRUCTION}\nArticle: {article}\nSummary:", f" {summary}")


_NewsEvent = Callable[[Faker, str], tuple[str, list[str], str]]  # (lead sentence, details, summary)


def _opening(fake: Faker, company: str) -> tuple[str, list[str], str]:
    rng = fake.random
    city, jobs = fake.city(), f"{fake.random_int(5, 200) * 10:,}"
    site = rng.choice(("factory", "warehouse", "research centre", "data centre", "distribution hub"))
    lead = rng.choice((
        f"{company} said on {fake.day_of_week()} that it will open a new {site} in {city}, creating {jobs} jobs.",
        f"A new {site} run by {company} will bring {jobs} jobs to {city}, the company announced on "
        f"{fake.day_of_week()}.",
    ))
    details = [f"Construction is expected to start in {fake.month_name()}.",
               f"The {site} will cost about ${fake.random_int(20, 900)} million."]
    return lead, details, f"{company} will open a {site} in {city}, creating {jobs} jobs."


def _acquisition(fake: Faker, company: str) -> tuple[str, list[str], str]:
    target, price = fake.company(), f"${fake.random_int(2, 95) * 10} million"
    lead = fake.random.choice((
        f"{company} has agreed to buy its rival {target} for {price}, the two companies said on {fake.day_of_week()}.",
        f"In a deal worth {price}, {target} will be bought by {company}, the companies announced.",
    ))
    details = [f"The deal is expected to close in {fake.month_name()}, subject to approval by regulators.",
               f"{target} has {fake.random_int(3, 60)} offices across the country."]
    return lead, details, f"{company} will buy {target} for {price}."


def _appointment(fake: Faker, company: str) -> tuple[str, list[str], str]:
    person, role = f"{fake.first_name()} {fake.last_name()}", fake.random.choice(
        ("chief executive", "chief financial officer", "chair", "head of research"))
    lead = fake.random.choice((
        f"{company} has named {person} as its new {role}, the company said on {fake.day_of_week()}.",
        f"{person} will become the next {role} of {company}, the board announced.",
    ))
    details = [f"{person.split()[0]} previously worked at {fake.company()} for {fake.random_int(3, 20)} years.",
               f"The appointment takes effect in {fake.month_name()}."]
    return lead, details, f"{company} has named {person} as its new {role}."


def _recall(fake: Faker, company: str) -> tuple[str, list[str], str]:
    rng = fake.random
    count, product = f"{fake.random_int(2, 300) * 100:,}", rng.choice(
        ("electric kettles", "bicycles", "car seats", "phone chargers", "space heaters", "baby monitors"))
    fault = rng.choice(("a fire risk", "a faulty part", "a wiring fault", "a choking hazard"))
    lead = rng.choice((
        f"{company} is recalling {count} {product} because of {fault}, it said on {fake.day_of_week()}.",
        f"Because of {fault}, {count} {product} made by {company} are being recalled.",
    ))
    details = [f"Customers can return the {product} to any store for a full refund.",
               f"No injuries have been reported, according to {company}."]
    return lead, details, f"{company} is recalling {count} {product} because of {fault}."


def _earnings(fake: Faker, company: str) -> tuple[str, list[str], str]:
    rng = fake.random
    change, percent = rng.choice(("rise", "fall")), fake.random_int(3, 60)
    quarter = rng.choice(("first-quarter", "second-quarter", "third-quarter", "fourth-quarter"))
    reason = rng.choice(("strong demand", "higher costs", "a weak dollar", "new products", "lower prices"))
    lead = rng.choice((
        f"{company} reported a {percent}% {change} in {quarter} profit on {fake.day_of_week()}, citing {reason}.",
        f"Citing {reason}, {company} said its {quarter} profit saw a {percent}% {change}.",
    ))
    details = [f"Revenue for the quarter was ${fake.random_int(100, 990)} million.",
               f"The company will report its next results in {fake.month_name()}."]
    return lead, details, f"{company} reported a {percent}% {change} in {quarter} profit because of {reason}."


def _strike(fake: Faker, company: str) -> tuple[str, list[str], str]:
    rng = fake.random
    city, issue = fake.city(), rng.choice(("pay", "working hours", "job cuts", "safety rules", "pensions"))
    workers = f"{fake.random_int(2, 90) * 10:,}"
    lead = rng.choice((
        f"About {workers} workers at the {company} plant in {city} went on strike on {fake.day_of_week()} over "
        f"{issue}.",
        f"A dispute over {issue} led {workers} workers at the {company} plant in {city} to walk out.",
    ))
    details = [f"The union said the strike would last until {fake.month_name()} unless talks resume.",
               "Production at the plant has stopped."]
    return lead, details, f"{workers} workers at the {company} plant in {city} went on strike over {issue}."


_NEWS_EVENTS: tuple[_NewsEvent, ...] = (_opening, _acquisition, _appointment, _recall, _earnings, _strike)


# ------------------------------------------------------------------------------------------------ entities

_ENTITY_INSTRUCTION = ("List the people, organizations and locations named in the text, as JSON with the keys "
                       '"person", "organization" and "location".')
# slots per1/org1/loc1... are entities; the rest (job, weekday, month, number) are not, though a weekday or a month
# is capitalised too
_ENTITY_TEMPLATES = (
    "{per1} joined {org1} as a {job} after ten years in {loc1}.",
    "The {org1} office in {loc1} was opened by {per1} on {weekday}.",
    "{per1} and {per2} met in {loc1} to discuss the future of {org1}.",
    "According to {per1}, {org1} will move its headquarters from {loc1} to {loc2}.",
    "Flights from {loc1} to {loc2} were cancelled on {weekday}, {org1} said.",
    "{per1} was born in {loc1} and studied in {loc2}.",
    "Shares of {org1} fell sharply after {per1} resigned in {month}.",
    "{org1} and {org2} announced a joint venture in {loc1}.",
    "A spokesperson for {org1} declined to comment.",
    "{per1} thanked the volunteers of {org1} for their work.",
    "The weather in {loc1} was unusually warm on {weekday}.",
    "Nobody was hurt, police said on {weekday}.",
    "{per1} wrote to {per2} from {loc1} every {month}.",
    "In {month}, {org1} hired {number} engineers in {loc1}.",
    "{per1}, a {job} from {loc1}, won the prize.",
    "The report by {org1} was written by {per1} and {per2}.",
    "Prices rose by {number}% in {month}, the ministry said.",
    "{per1} sold her shares in {org1} to {org2}.",
    "Talks between {org1} and the unions in {loc1} ended without a deal.",
    "Visitors to {loc1} can take a ferry to {loc2} on {weekday}.",
)
_ENTITY_KINDS = {"per": "person", "org": "organization", "loc": "location"}

Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Entities(BaseModel):
    """The extraction adapter's answer: what it is trained to write, and the pydantic model whose JSON schema the
    lesson's server part constrains it with. No keys beyond these, and bounded lists and names (the data never
    exceeds them), so every output the schema allows is short enough to finish within a request's tokens."""

    model_config = ConfigDict(extra="forbid")

    person: list[Name] = Field(max_length=4)
    organization: list[Name] = Field(max_length=4)
    location: list[Name] = Field(max_length=4)


def format_entities(entities: list[tuple[str, str]]) -> str:
    """`Entities` as compact JSON (the separators loraserve's JSON grammar allows by default), names in order of
    appearance within each type."""
    grouped = {kind: [name for k, name in entities if k == kind] for kind in ENTITY_TYPES}
    return Entities.model_validate(grouped).model_dump_json()


def parse_entities(text: str) -> set[tuple[str, str]]:
    """The (type, name) pairs of an answer that parses as `Entities`; anything else (prose, a broken or foreign
    JSON object) holds no entity, so a model that does not answer in the format scores no hits."""
    try:
        entities = Entities.model_validate_json(text.strip())
    except (ValidationError, json.JSONDecodeError):
        return set()
    return {(kind, name) for kind, names in entities.model_dump().items() for name in names}


def _entity_text(fake: Faker) -> Example:
    rng = fake.random
    templates = rng.sample(_ENTITY_TEMPLATES, rng.choice((1, 1, 2)))
    sentences, entities = [], []
    for template in templates:
        values = {"job": fake.job().split(",")[0].lower(), "weekday": fake.day_of_week(),
                  "month": fake.month_name(), "number": str(fake.random_int(2, 40))}
        for slot in _slots(template):
            kind = _ENTITY_KINDS.get(slot[:3])
            if kind is None:
                continue
            values[slot] = _entity_value(fake, kind)
            entities.append((kind, values[slot]))
        sentences.append(template.format(**values))
    text = " ".join(sentences)
    # the answer starts a line of its own: a JSON grammar allows no leading space, so the adapter learns to write
    # the first token the schema-constrained server lets it write
    return Example(f"{_ENTITY_INSTRUCTION}\nText: {text}\nEntities:\n", format_entities(entities))


def _slots(template: str) -> list[str]:
    """The template's field names in order of appearance."""
    return [field for _, field, _, _ in Formatter().parse(template) if field]


def _entity_value(fake: Faker, kind: str) -> str:
    if kind == "person":
        return f"{fake.first_name()} {fake.last_name()}"
    if kind == "organization":
        return fake.company()
    return fake.city() if fake.random.random() < 0.6 else fake.country()


_BUILDERS: dict[str, Callable[[Faker], Example]] = {"style": _telegram, "summary": _news, "entities": _entity_text}

