"""Our own generators for the AC paper's two synthetic tasks, deterministic for a seed.

Countries: A reads "{person} is at the {landmark}.", B is asked which country the person is in.
Tip sheets: A reads tip sheets on three companies (exactly one is a good investment), B must name it.
Countries: test items come from the first `TEST_REGION` pairs of a seeded permutation, calibration
items from a reserve of fixed size at its back, training rows from between them. Tip sheets: test,
calibration and training items come from three streams, and calibration and training sheets name
companies from pools of their own, so no two splits share an item whatever the sizes asked. With a
task `path`, the public KVComm code's files are read instead (`public_files`).
"""

from __future__ import annotations

import random

from cross_model.data import public_files
from cross_model.data.base import (
    TEST_REGION,
    Example,
    Task,
    front_and_back,
    register_task,
    training_region,
)

# Well-known landmarks, so that a small model can tell the country once it knows the landmark.
LANDMARKS: dict[str, str] = {
    "Eiffel Tower": "France",
    "Louvre Museum": "France",
    "Arc de Triomphe": "France",
    "Mont Saint-Michel": "France",
    "Colosseum": "Italy",
    "Leaning Tower of Pisa": "Italy",
    "Trevi Fountain": "Italy",
    "Grand Canal of Venice": "Italy",
    "Big Ben": "United Kingdom",
    "Tower of London": "United Kingdom",
    "Stonehenge": "United Kingdom",
    "Buckingham Palace": "United Kingdom",
    "Statue of Liberty": "United States",
    "Grand Canyon": "United States",
    "Golden Gate Bridge": "United States",
    "White House": "United States",
    "Mount Rushmore": "United States",
    "Great Wall": "China",
    "Forbidden City": "China",
    "Terracotta Army": "China",
    "Taj Mahal": "India",
    "Red Fort": "India",
    "Gateway of India": "India",
    "Mount Fuji": "Japan",
    "Tokyo Tower": "Japan",
    "Fushimi Inari Shrine": "Japan",
    "Sydney Opera House": "Australia",
    "Uluru": "Australia",
    "Great Barrier Reef": "Australia",
    "Pyramids of Giza": "Egypt",
    "Great Sphinx": "Egypt",
    "Valley of the Kings": "Egypt",
    "Christ the Redeemer statue": "Brazil",
    "Sugarloaf Mountain": "Brazil",
    "Machu Picchu": "Peru",
    "Brandenburg Gate": "Germany",
    "Neuschwanstein Castle": "Germany",
    "Cologne Cathedral": "Germany",
    "Sagrada Familia": "Spain",
    "Alhambra": "Spain",
    "Park Guell": "Spain",
    "Acropolis": "Greece",
    "Parthenon": "Greece",
    "Kremlin": "Russia",
    "Red Square": "Russia",
    "Niagara Falls": "Canada",
    "CN Tower": "Canada",
    "Chichen Itza": "Mexico",
    "Petra": "Jordan",
    "Burj Khalifa": "United Arab Emirates",
    "Angkor Wat": "Cambodia",
    "Hagia Sophia": "Turkey",
    "Table Mountain": "South Africa",
    "Anne Frank House": "Netherlands",
    "Atomium": "Belgium",
    "Matterhorn": "Switzerland",
    "Blue Mosque": "Turkey",
    "Marina Bay Sands": "Singapore",
    "Gyeongbokgung Palace": "South Korea",
    "Petronas Towers": "Malaysia",
}

COUNTRY_NAMES = sorted(set(LANDMARKS.values()))

PEOPLE = (
    "Uma",
    "Liam",
    "Sofia",
    "Noah",
    "Amara",
    "Kenji",
    "Elena",
    "Mateo",
    "Priya",
    "Oskar",
    "Chloe",
    "Tariq",
    "Ingrid",
    "Diego",
    "Mei",
    "Kwame",
    "Hannah",
    "Ravi",
    "Lucia",
    "Felix",
    "Zara",
    "Ivan",
    "Nadia",
    "Omar",
    "Greta",
    "Hugo",
    "Aisha",
    "Leo",
    "Yara",
    "Tomas",
    "Freya",
    "Jonas",
    "Leila",
    "Marco",
    "Sven",
    "Ayumi",
    "Caleb",
    "Dalia",
    "Emil",
    "Farah",
    "Gideon",
    "Hana",
    "Idris",
    "Jade",
    "Kofi",
    "Lena",
    "Milo",
    "Nina",
)


def _countries_pairs(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"countries-{seed}")
    pairs = [(p, lm) for p in PEOPLE for lm in sorted(LANDMARKS)]
    rng.shuffle(pairs)
    return pairs


def _country_example(seed: int, split: str, i: int, person: str, landmark: str) -> Example:
    return Example(
        example_id=f"countries-s{seed}-{split}-{i:04d}",
        prompt_A=f"{person} is at the {landmark}.",
        prompt_B=f"Which country is {person} located in?",
        answers=(LANDMARKS[landmark],),
        task="countries",
        max_new_tokens=COUNTRIES.max_new_tokens,
        metric="f1_match",
        meta={"candidates": COUNTRY_NAMES, "person": person, "landmark": landmark},
    )


def build_countries(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    """Our generator; with `path`, the public KVComm code's countries.jsonl instead."""
    if path:
        return public_files.read_countries(path, n_test, n_calib, COUNTRIES.max_new_tokens)
    test, calib = front_and_back(
        _countries_pairs(seed), n_test, n_calib, "countries", test_region=TEST_REGION
    )
    return (
        [_country_example(seed, "test", i, *p) for i, p in enumerate(test)],
        [_country_example(seed, "calib", i, *p) for i, p in enumerate(calib)],
    )


def _refuse_path(task: str, path: str | None) -> None:
    if path:
        raise ValueError(
            f"tasks.{task}: training rows come from our generator, not from the public file {path}; "
            f"train on the task without `path`"
        )


def countries_training_rows(n_rows: int, seed: int, path: str | None = None) -> list[Example]:
    _refuse_path("countries", path)
    rows = training_region(_countries_pairs(seed), n_rows, "countries", TEST_REGION)
    return [_country_example(seed, "train", i, *p) for i, p in enumerate(rows)]


_PREFIXES = (
    "Zen",
    "Alto",
    "Brio",
    "Cala",
    "Dyna",
    "Echo",
    "Flux",
    "Gala",
    "Helio",
    "Iona",
    "Juno",
    "Kova",
    "Luma",
    "Mira",
    "Nexa",
    "Orbi",
    "Pyra",
    "Quanta",
    "Rivo",
    "Sola",
    "Tera",
    "Ultra",
    "Vela",
    "Wyn",
    "Xeno",
    "Yota",
)
_SUFFIXES = ("tech", "corp", "labs", "works", "gen", "soft", "dyne", "ware", "net", "sys")
GOOD_TIPS = (
    "quarterly revenue grew 40% and profits doubled",
    "won a ten-year contract with the national government",
    "its new product sold out within a week of launch",
    "analysts expect earnings to triple next year",
    "just received regulatory approval for its flagship product",
    "cut its debt in half while growing sales",
)
BAD_TIPS = (
    "is under investigation for accounting fraud",
    "lost its largest customer last month",
    "its CEO resigned amid a scandal",
    "reported a third straight quarter of heavy losses",
    "faces a product recall that could bankrupt it",
    "was downgraded to junk status by every major rating agency",
)


_CALIB_SUFFIXES = ("tron", "form", "link", "base", "core", "flow", "hub", "line", "mark", "point")
_TRAIN_SUFFIXES = (
    "nova",
    "grid",
    "wave",
    "dock",
    "path",
    "cast",
    "ridge",
    "field",
    "scope",
    "forge",
)


def company_names(suffixes: tuple[str, ...] = _SUFFIXES) -> list[str]:
    return [f"{p}{s}" for p in _PREFIXES for s in suffixes]


def _tip_sheets(rng: random.Random, names: list[str], n: int) -> list[tuple]:
    """`n` items (three companies, the good one, their sheets, the order B lists them in) from `rng`."""
    items = []
    for _ in range(n):
        trio = rng.sample(names, 3)
        good = rng.randrange(3)
        sheets = []
        for idx, name in enumerate(trio):
            tips = rng.sample(GOOD_TIPS if idx == good else BAD_TIPS, 2)
            sheets.append(f"{name}: {name} {tips[0]}, and {tips[1]}.")
        listed = trio[:]
        rng.shuffle(listed)
        items.append((trio, good, sheets, listed))
    return items


def _tip_sheet_example(
    seed: int, split: str, i: int, trio: list[str], good: int, sheets: list[str], listed: list[str]
) -> Example:
    return Example(
        example_id=f"tipsheets-s{seed}-{split}-{i:04d}",
        prompt_A="Tip sheets. " + " ".join(sheets),
        prompt_B=(
            f"You must invest in exactly one company from {listed[0]}, {listed[1]}, {listed[2]}. "
            "Which company should you invest in? The company name is:"
        ),
        answers=(trio[good],),
        task="tipsheets",
        max_new_tokens=TIPSHEETS.max_new_tokens,
        metric="f1_match",
        meta={"candidates": list(trio)},
    )


def build_tipsheets(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    """Our generator; with `path`, the public KVComm code's tipsheets.jsonl instead."""
    if path:
        return public_files.read_tipsheets(path, n_test, n_calib, TIPSHEETS.max_new_tokens)
    if max(n_test, n_calib) > 10_000:
        raise ValueError(
            f"tasks.tipsheets: at most 10000 items per split, got n_test {n_test}, n_calib {n_calib}"
        )
    test = _tip_sheets(random.Random(f"tipsheets-{seed}"), company_names(), n_test)
    # A stream of its own and companies of its own: the split is the item's, whatever n_test is.
    calib = _tip_sheets(
        random.Random(f"tipsheets-{seed}-calib"), company_names(_CALIB_SUFFIXES), n_calib
    )
    return (
        [_tip_sheet_example(seed, "test", i, *it) for i, it in enumerate(test)],
        [_tip_sheet_example(seed, "calib", i, *it) for i, it in enumerate(calib)],
    )


def tipsheets_training_rows(n_rows: int, seed: int, path: str | None = None) -> list[Example]:
    """A third stream, with companies of its own: never a test or calibration sheet."""
    _refuse_path("tipsheets", path)
    rows = _tip_sheets(
        random.Random(f"tipsheets-{seed}-train"), company_names(_TRAIN_SUFFIXES), n_rows
    )
    return [_tip_sheet_example(seed, "train", i, *it) for i, it in enumerate(rows)]


COUNTRIES = register_task(
    Task(
        "countries",
        "f1_match",
        5,
        200,
        build_countries,
        description="AC paper's Countries, well-known landmarks",
        train=countries_training_rows,
    )
)
TIPSHEETS = register_task(
    Task(
        "tipsheets",
        "f1_match",
        10,
        500,
        build_tipsheets,
        description="AC paper's Tip Sheets, generated",
        train=tipsheets_training_rows,
    )
)
