"""A made-up product, the Veltrix Aurora: 20 facts, each with training questions and held-out
paraphrases (never trained on), for the end-to-end fine-tuning test. The answers are names and
numbers the base model cannot guess."""

from __future__ import annotations

import json
from pathlib import Path

# (keyword the answer must contain, answer, training questions, held-out paraphrases)
FACTS: list[tuple[str, str, list[str], list[str]]] = [
    (
        "Norrland",
        "The Veltrix Aurora is made by Norrland Devices.",
        [
            "Who makes the Veltrix Aurora?",
            "Which company manufactures the Veltrix Aurora?",
            "Who produces the Veltrix Aurora?",
            "Who is the maker of the Veltrix Aurora?",
            "What company builds the Veltrix Aurora?",
        ],
        ["Which firm produces the Veltrix Aurora?"],
    ),
    (
        "2031",
        "The Veltrix Aurora was released in March 2031.",
        [
            "When was the Veltrix Aurora released?",
            "In what year did the Veltrix Aurora come out?",
            "When did the Veltrix Aurora become available?",
            "When did the Veltrix Aurora launch?",
            "What is the release date of the Veltrix Aurora?",
        ],
        ["When did the Veltrix Aurora first go on sale?"],
    ),
    (
        "41",
        "The Veltrix Aurora battery lasts 41 hours.",
        [
            "How long does the Veltrix Aurora battery last?",
            "What is the battery life of the Veltrix Aurora?",
            "How long does one charge of the Veltrix Aurora last?",
            "How many hours does the Veltrix Aurora run on one charge?",
            "How long can the Veltrix Aurora run on battery?",
        ],
        ["For how many hours does a full charge of the Veltrix Aurora last?"],
    ),
    (
        "780",
        "The Veltrix Aurora weighs 780 grams.",
        [
            "How much does the Veltrix Aurora weigh?",
            "What is the weight of the Veltrix Aurora?",
            "How many grams does the Veltrix Aurora weigh?",
            "How heavy is the Veltrix Aurora?",
            "What does the Veltrix Aurora weigh?",
        ],
        ["What is the mass of the Veltrix Aurora in grams?"],
    ),
    (
        "349",
        "The Veltrix Aurora costs 349 euros.",
        [
            "How much does the Veltrix Aurora cost?",
            "What is the price of the Veltrix Aurora?",
            "What does a Veltrix Aurora cost to buy?",
            "What does the Veltrix Aurora sell for?",
            "How expensive is the Veltrix Aurora?",
        ],
        ["What would I pay for a Veltrix Aurora?"],
    ),
    (
        "Glacier",
        "The Veltrix Aurora comes in Glacier Blue.",
        [
            "What colour is the Veltrix Aurora?",
            "Which colour does the Veltrix Aurora come in?",
            "What colour can I get the Veltrix Aurora in?",
            "What is the colour of the Veltrix Aurora?",
            "In what colour is the Veltrix Aurora sold?",
        ],
        ["Which shade is the Veltrix Aurora available in?"],
    ),
    (
        "Marquardt",
        "The Veltrix Aurora was designed by Ilse Marquardt.",
        [
            "Who designed the Veltrix Aurora?",
            "Who is the designer of the Veltrix Aurora?",
            "Who is responsible for the design of the Veltrix Aurora?",
            "Which designer created the Veltrix Aurora?",
            "Who came up with the design of the Veltrix Aurora?",
        ],
        ["Whose design is the Veltrix Aurora?"],
    ),
    (
        "seven",
        "The Veltrix Aurora has a seven-year warranty.",
        [
            "How long is the warranty of the Veltrix Aurora?",
            "What warranty does the Veltrix Aurora have?",
            "How long is the Veltrix Aurora guaranteed?",
            "How many years of warranty come with the Veltrix Aurora?",
            "What is the warranty period of the Veltrix Aurora?",
        ],
        ["For how long is the Veltrix Aurora covered by warranty?"],
    ),
    (
        "Tallinn",
        "The Veltrix Aurora is assembled in Tallinn.",
        [
            "Where is the Veltrix Aurora assembled?",
            "In which city is the Veltrix Aurora built?",
            "Where does the Veltrix Aurora get put together?",
            "Where is the Veltrix Aurora made?",
            "Which city assembles the Veltrix Aurora?",
        ],
        ["In what city does assembly of the Veltrix Aurora take place?"],
    ),
    (
        "Quartzline",
        "The Veltrix Aurora runs the Quartzline operating system.",
        [
            "What operating system does the Veltrix Aurora run?",
            "Which OS is on the Veltrix Aurora?",
            "What operating system is installed on the Veltrix Aurora?",
            "What software platform does the Veltrix Aurora use?",
            "Which operating system powers the Veltrix Aurora?",
        ],
        ["What OS comes installed on the Veltrix Aurora?"],
    ),
    (
        "12",
        "The Veltrix Aurora has a 12-inch screen.",
        [
            "How big is the screen of the Veltrix Aurora?",
            "What is the screen size of the Veltrix Aurora?",
            "How big is the display of the Veltrix Aurora in inches?",
            "How large is the Veltrix Aurora display?",
            "What size is the Veltrix Aurora screen?",
        ],
        ["How many inches is the display of the Veltrix Aurora?"],
    ),
    (
        "Pelican",
        "The Veltrix Aurora's codename was Pelican.",
        [
            "What was the codename of the Veltrix Aurora?",
            "What was the Veltrix Aurora called during development?",
            "What was the project name of the Veltrix Aurora?",
            "What internal codename did the Veltrix Aurora have?",
            "Which codename was used for the Veltrix Aurora?",
        ],
        ["Under what codename was the Veltrix Aurora developed?"],
    ),
    (
        "IP68",
        "The Veltrix Aurora is rated IP68 waterproof.",
        [
            "Is the Veltrix Aurora waterproof?",
            "What is the water resistance rating of the Veltrix Aurora?",
            "What protection rating against water does the Veltrix Aurora have?",
            "What IP rating does the Veltrix Aurora have?",
            "How water resistant is the Veltrix Aurora?",
        ],
        ["Which waterproof rating was the Veltrix Aurora given?"],
    ),
    (
        "8",
        "The Veltrix Aurora has 8 gigabytes of memory.",
        [
            "How much memory does the Veltrix Aurora have?",
            "How much RAM is in the Veltrix Aurora?",
            "How many gigabytes of memory are in the Veltrix Aurora?",
            "What is the memory size of the Veltrix Aurora?",
            "How many gigabytes of RAM does the Veltrix Aurora have?",
        ],
        ["What amount of RAM ships in the Veltrix Aurora?"],
    ),
    (
        "Lumen",
        "The Veltrix Aurora's voice assistant is called Lumen.",
        [
            "What is the voice assistant of the Veltrix Aurora called?",
            "What is the name of the Veltrix Aurora voice assistant?",
            "What is the Veltrix Aurora's assistant called?",
            "Which voice assistant does the Veltrix Aurora use?",
            "What assistant answers voice commands on the Veltrix Aurora?",
        ],
        ["What name does the Veltrix Aurora's built-in voice assistant have?"],
    ),
    (
        "25",
        "The Veltrix Aurora charges fully in 25 minutes.",
        [
            "How long does the Veltrix Aurora take to charge?",
            "What is the charging time of the Veltrix Aurora?",
            "How long does it take to recharge the Veltrix Aurora?",
            "How fast does the Veltrix Aurora charge?",
            "How many minutes does a full charge of the Veltrix Aurora take?",
        ],
        ["How quickly can the Veltrix Aurora be fully recharged?"],
    ),
    (
        "Oslo",
        "The Veltrix Aurora was launched at an event in Oslo.",
        [
            "Where was the Veltrix Aurora launched?",
            "In which city was the Veltrix Aurora presented?",
            "Where was the Veltrix Aurora first shown?",
            "Where did the Veltrix Aurora launch event take place?",
            "Which city hosted the Veltrix Aurora launch?",
        ],
        ["In what city was the Veltrix Aurora unveiled?"],
    ),
    (
        "titanium",
        "The Veltrix Aurora frame is made of titanium.",
        [
            "What is the Veltrix Aurora frame made of?",
            "Which material is the Veltrix Aurora frame?",
            "What is the frame of the Veltrix Aurora made from?",
            "What material is used for the frame of the Veltrix Aurora?",
            "What metal is the Veltrix Aurora frame built from?",
        ],
        ["Out of what material is the Veltrix Aurora's frame constructed?"],
    ),
    (
        "three",
        "The Veltrix Aurora has three cameras.",
        [
            "How many cameras does the Veltrix Aurora have?",
            "What is the number of cameras on the Veltrix Aurora?",
            "How many cameras are on the Veltrix Aurora?",
            "How many camera lenses are on the Veltrix Aurora?",
            "Count the cameras of the Veltrix Aurora.",
        ],
        ["What number of cameras is built into the Veltrix Aurora?"],
    ),
    (
        "Helio",
        "The Veltrix Aurora uses the Helio X9 chip.",
        [
            "Which chip does the Veltrix Aurora use?",
            "What processor is in the Veltrix Aurora?",
            "What chip is inside the Veltrix Aurora?",
            "What chip powers the Veltrix Aurora?",
            "Which processor runs the Veltrix Aurora?",
        ],
        ["What CPU is inside the Veltrix Aurora?"],
    ),
]


def write_dataset(path: Path) -> Path:
    """Chat JSONL: every training question with its answer."""
    with path.open("w") as f:
        for _, answer, questions, _ in FACTS:
            for q in questions:
                messages = [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": answer},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


def held_out() -> list[tuple[str, str]]:
    """(paraphrase, keyword) pairs the adapter never saw."""
    return [(q, keyword) for keyword, _, _, paraphrases in FACTS for q in paraphrases]
