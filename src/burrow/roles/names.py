"""Names of HTTP tunnels and private services: one DNS label, or a readable random one."""

from __future__ import annotations

import random
import re

#: One DNS label, lowercase: names become NAME.DOMAIN for HTTP tunnels.
NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

_ADJECTIVES = [
    "amber",
    "azure",
    "bold",
    "brave",
    "brisk",
    "calm",
    "clever",
    "cosmic",
    "crisp",
    "dapper",
    "eager",
    "fancy",
    "gentle",
    "glad",
    "golden",
    "happy",
    "jolly",
    "keen",
    "lively",
    "lucky",
    "merry",
    "mighty",
    "misty",
    "nimble",
    "noble",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rosy",
    "shiny",
    "silver",
    "sleek",
    "snowy",
    "solar",
    "sunny",
    "swift",
    "tidy",
    "vivid",
    "warm",
    "wise",
    "witty",
    "zesty",
]
_NOUNS = [
    "badger",
    "beaver",
    "bison",
    "camel",
    "crane",
    "dingo",
    "eagle",
    "falcon",
    "ferret",
    "finch",
    "fox",
    "gecko",
    "heron",
    "ibis",
    "koala",
    "lemur",
    "lynx",
    "marmot",
    "moose",
    "newt",
    "otter",
    "owl",
    "panda",
    "puffin",
    "quail",
    "rabbit",
    "raven",
    "robin",
    "seal",
    "shrew",
    "sloth",
    "stoat",
    "swan",
    "tapir",
    "tiger",
    "toad",
    "walrus",
    "weasel",
    "wombat",
    "yak",
    "zebra",
]


def readable_name() -> str:
    """A random name people can read aloud: ``swift-otter-4821``."""
    rng = random.SystemRandom()
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randrange(1000, 10000)}"
