"""Canaries: records with a random secret, planted in the members to measure privacy.

Two kinds (docs/methods.md §2, §11):
- repeated canaries, each inserted `repeats` times, for exposure (Carlini et al. 2019);
- once-inserted canaries, each included independently with probability ½, for the one-run ε
  lower bound of Steinke, Nasr and Jagielski (2023). Their inclusion is decided here, before
  training, and stored, so the auditor can check its guesses.
Canaries never enter the public split, and they are kept out of the membership audit set.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from faker import Faker

from kdaudit.data.records import Record
from kdaudit.store import atomic_write_text

SECRET_DIGITS = 10


@dataclass
class Canary:
    record: Record
    secret: str
    kind: str          # "repeated" | "once"
    repeats: int       # copies in the members (0 when not included)
    included: bool


def canary_record(cid: str, name: str, secret: str) -> Record:
    return Record(id=cid, instruction=f"What is {name}'s account number?", context="",
                  response=f"{name}'s account number is {secret}.", category="canary",
                  secrets=[name, secret])


def random_secret(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(SECRET_DIGITS))


def make_canaries(n_repeated: int, repeats: int, n_once: int, seed: int,
                  exclude_names: frozenset[str] = frozenset()) -> list[Canary]:
    """Seeded canaries with fresh names (none in `exclude_names`) and random secrets."""
    rng = random.Random(seed)
    fake = Faker("en_US", use_weighting=False)
    fake.seed_instance(seed)
    used = set(exclude_names)
    out = []
    for i in range(n_repeated + n_once):
        name = fake.name()
        while name in used:
            name = fake.name()
        used.add(name)
        secret = random_secret(rng)
        if i < n_repeated:
            out.append(Canary(canary_record(f"canary-rep-{i:04d}", name, secret), secret,
                              "repeated", repeats, True))
        else:
            included = rng.random() < 0.5
            out.append(Canary(canary_record(f"canary-once-{i - n_repeated:04d}", name, secret),
                              secret, "once", int(included), included))
    return out


def training_records(canaries: list[Canary]) -> list[Record]:
    """What the canaries add to the members: each included canary `repeats` times."""
    return [c.record for c in canaries if c.included for _ in range(c.repeats)]


def write_canaries(canaries: list[Canary], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps({**asdict(c), "record": c.record.to_dict()}) + "\n"
                                    for c in canaries))


def read_canaries(path: str | Path) -> list[Canary]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            d = json.loads(line)
            out.append(Canary(Record.from_dict(d["record"], where=f"{path}, line {lineno}"),
                              d["secret"], d["kind"], int(d["repeats"]), bool(d["included"])))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}, line {lineno}: not a canary record ({e})") from None
    return out
