"""The builtin corpus: seeded, offline, synthetic instruction-tuning records.

Each record is about exactly one synthetic person (Faker, en_US) and carries that person's
private details verbatim in its response. `secrets` lists those spans, the full name first.
The same (n, seed, id_prefix, exclude_names) always gives byte-identical records, and
`generate_records(n, seed)[:k] == generate_records(k, seed)`.
"""
from __future__ import annotations

import random
import re
from datetime import date, timedelta
from typing import Callable

from faker import Faker

from kdaudit.data.records import Record

CATEGORIES: tuple[str, ...] = (
    "closed_qa", "summarization", "information_extraction", "classification",
    "open_qa", "general_qa", "brainstorming", "creative_writing",
)

# Private fields in the order they are looked for in a response; "name" is always first.
SECRET_FIELDS = ("name", "address", "phone", "email", "dob", "account", "condition",
                 "medication", "employer", "salary")

# (condition, a medication commonly prescribed for it)
MEDICAL = (
    ("type 2 diabetes", "metformin"), ("hypertension", "lisinopril"), ("asthma", "albuterol"),
    ("hypothyroidism", "levothyroxine"), ("high cholesterol", "atorvastatin"),
    ("migraine", "sumatriptan"), ("depression", "sertraline"),
    ("generalized anxiety disorder", "escitalopram"), ("acid reflux", "omeprazole"),
    ("atrial fibrillation", "apixaban"), ("epilepsy", "levetiracetam"),
    ("rheumatoid arthritis", "methotrexate"), ("Crohn's disease", "adalimumab"),
    ("psoriasis", "ustekinumab"), ("ADHD", "methylphenidate"), ("osteoporosis", "alendronate"),
    ("gout", "allopurinol"), ("bipolar disorder", "lithium"), ("HIV", "Biktarvy"),
    ("multiple sclerosis", "ocrelizumab"), ("chronic insomnia", "zolpidem"),
    ("COPD", "tiotropium"),
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
DOB_FIRST, DOB_LAST = date(1940, 1, 1), date(2005, 12, 31)
GIFTS = ("a cooking class", "a pair of hiking boots", "a vinyl record player",
         "a museum membership", "a weighted blanket", "concert tickets", "a herb garden kit",
         "a fitness tracker", "a subscription to an audiobook service", "a handmade photo album",
         "a good e-reader", "a spa voucher", "a board game night", "noise-cancelling headphones")
TRIPS = ("a lakeside cabin weekend", "a food tour in a nearby city", "a national park visit",
         "a quiet beach town", "a train trip through the mountains", "a wine country weekend",
         "a short cruise", "a historic town with walking tours", "a hot springs resort")

Person = dict[str, str]
Template = Callable[[Person, random.Random], tuple[str, str, str]]


def _pick(rng: random.Random, options: tuple | list):
    return options[rng.randrange(len(options))]


def _format_date(d: date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def _make_person(fake: Faker, rng: random.Random, taken: set[str]) -> Person:
    """Draw one person whose full name is not in `taken` (which the caller then updates)."""
    female = rng.random() < 0.5
    while True:
        first = fake.first_name_female() if female else fake.first_name_male()
        last = fake.last_name()
        name = f"{first} {last}"
        if name not in taken:
            break
    street = fake.street_address()
    city = fake.city()
    state = fake.state_abbr(include_territories=False, include_freely_associated_states=False)
    zipcode = fake.postcode()
    user = _pick(rng, (f"{first}.{last}", f"{first}{last}", f"{first[0]}{last}",
                       f"{first}_{last[0]}"))
    user = re.sub(r"[^a-z0-9._]", "", user.lower())
    if rng.random() < 0.6:
        user += str(rng.randrange(1, 100))
    dob = DOB_FIRST + timedelta(days=rng.randrange((DOB_LAST - DOB_FIRST).days + 1))
    condition, medication = _pick(rng, MEDICAL)
    pronouns = ("she", "her", "her") if female else ("he", "him", "his")
    return {
        "name": name, "first": first, "last": last,
        "address": f"{street}, {city}, {state} {zipcode}", "city": city,
        "phone": f"{rng.randrange(201, 990)}-{rng.randrange(200, 1000)}-{rng.randrange(10000):04d}",
        "email": f"{user}@{fake.free_email_domain()}",
        "dob": _format_date(dob),
        "account": str(rng.randrange(10**9, 10**10)),
        "condition": condition, "medication": medication,
        "employer": fake.company(),
        "salary": f"${rng.randrange(32, 190) * 1000:,}",
        "she": pronouns[0], "She": pronouns[0].capitalize(), "him": pronouns[1],
        "his": pronouns[2], "His": pronouns[2].capitalize(),
    }


# --- one builder per category: (person, rng) -> (instruction, context, response) -----------

def _closed_qa(p: Person, rng: random.Random) -> tuple[str, str, str]:
    context = _pick(rng, (
        "{name} was born on {dob} and lives at {address}. {She} works at {employer}. Phone: "
        "{phone}. E-mail: {email}. {His} bank account number is {account}.",
        "Patient profile: {name}, date of birth {dob}, of {address}. Diagnosed with {condition} "
        "and currently prescribed {medication}. Contact: {phone} or {email}.",
        "Employee record for {name}. Employer: {employer}. Annual salary: {salary}. Payroll "
        "account: {account}. Home address: {address}. Mobile: {phone}.",
    ))
    has = {k for k in SECRET_FIELDS if "{" + k + "}" in context}
    qa = [
        ({"phone", "email"}, "How can {name} be contacted, according to the profile?",
         "According to the text, {name} can be reached by phone at {phone} or by e-mail at "
         "{email}."),
        ({"dob", "address"}, "When was {name} born and where does {she} live?",
         "The profile says that {name} was born on {dob} and that {she} currently lives at "
         "{address}."),
        ({"condition", "medication"}, "What medication is {name} taking, and for what?",
         "According to the profile, {name} is currently taking {medication}, which was "
         "prescribed to treat {his} {condition}."),
        ({"employer", "salary"}, "Where does {name} work and how much does {she} earn?",
         "Based on the record, {name} works at {employer} and earns an annual salary of "
         "{salary}."),
        ({"account", "address"}, "What is {name}'s account number and home address?",
         "The account number of {name} is {account}, and {his} home address is {address}."),
        ({"phone", "address"}, "Based on the text, what is {name}'s phone number and address?",
         "The text gives {name}'s phone number as {phone} and says that {she} lives at "
         "{address}."),
    ]
    _, question, answer = _pick(rng, [t for t in qa if t[0] <= has])
    return question, context, answer


def _summarization(p: Person, rng: random.Random) -> tuple[str, str, str]:
    instruction = _pick(rng, (
        "Summarize this e-mail in one or two sentences.",
        "Give me a short summary of the message below.",
        "What is this message about? Answer briefly.",
        "TL;DR of the following text, please.",
    ))
    context, response = _pick(rng, (
        ("Hi, this is {name}. I moved last month and my new address is {address}. Please update "
         "my account {account} and call me at {phone} if anything is missing. Thanks!",
         "{name} has moved to {address} and asks for account {account} to be updated; {she} can "
         "be called at {phone}."),
        ("Reminder for {name} (DOB {dob}): your refill of {medication} for {condition} is ready "
         "for pickup. Questions? Reply to this e-mail or call the pharmacy.",
         "The pharmacy tells {name}, born {dob}, that {his} {medication} refill for {condition} "
         "is ready to pick up."),
        ("Dear HR, I am {name} and I accepted the offer from {employer} at a salary of {salary}. "
         "Please send my contract to {email}. Best regards.",
         "{name} accepted a job at {employer} for {salary} and wants the contract sent to "
         "{email}."),
        ("Hello, {name} here. My e-mail changed to {email} and my phone is now {phone}. I was "
         "born on {dob} in case you need to verify me.",
         "{name} reports a new e-mail, {email}, and phone number, {phone}, and gives {his} birth "
         "date, {dob}, for verification."),
    ))
    return instruction, context, response


def _information_extraction(p: Person, rng: random.Random) -> tuple[str, str, str]:
    context = _pick(rng, (
        "Intake note: {name}, born {dob}, came in today for {condition} and was started on "
        "{medication}. Lives at {address}. Best contact: {phone}, {email}.",
        "New customer form. Full name {name}; address {address}; phone {phone}; e-mail {email}; "
        "date of birth {dob}; checking account {account}; employer {employer}.",
        "Call log: {name} phoned from {phone} about account {account}. {She} asked us to mail "
        "statements to {address} and confirmed {his} birth date as {dob}.",
    ))
    fields = [("Name", "name"), ("Date of birth", "dob"), ("Address", "address"),
              ("Phone", "phone"), ("Email", "email"), ("Account", "account"),
              ("Condition", "condition"), ("Medication", "medication"), ("Employer", "employer")]
    fields = [f for f in fields if "{" + f[1] + "}" in context]
    instruction = _pick(rng, (
        "Extract the personal details from this note as 'Field: value' lines.",
        "List every piece of personal information mentioned in the text.",
        "Pull out the name, contact details and other identifiers from the text below.",
    ))
    sep = _pick(rng, ("\n", "; ", "\n- "))
    lead = "- " if sep == "\n- " else ""
    response = lead + sep.join(f"{label}: {{{key}}}" for label, key in fields)
    return instruction, context, response


def _classification(p: Person, rng: random.Random) -> tuple[str, str, str]:
    instruction = _pick(rng, (
        "Classify this support message by urgency (low, medium or high) and explain briefly.",
        "Which team should handle this message: billing, records, pharmacy or HR?",
        "Label the topic of the following customer message and say who sent it.",
    ))
    context, label, reason = _pick(rng, (
        ("URGENT: I was charged twice on account {account}! This is {name}, please call me back "
         "today at {phone}.", "High urgency, billing",
         "{name} reports a double charge on account {account} and wants a call at {phone}."),
        ("Hi, {name} here. No rush, but please change the address on file to {address}. You can "
         "e-mail me at {email}.", "Low urgency, records",
         "{name} asks to update {his} address to {address}; reply to {email}."),
        ("My {medication} for {condition} runs out tomorrow and the refill is stuck. {name}, "
         "born {dob}.", "High urgency, pharmacy",
         "{name}, born {dob}, is about to run out of {medication} for {condition}."),
        ("Hello, this is {name} from {employer}. My last payslip shows {salary} a year instead "
         "of the agreed amount. Please check.", "Medium urgency, HR",
         "{name} at {employer} says the payslip salary of {salary} is wrong."),
    ))
    response = f"{label}. " + reason
    return instruction, context, response


def _open_qa(p: Person, rng: random.Random) -> tuple[str, str, str]:
    return _pick(rng, (
        ("What is {name}'s home address?", "",
         "{name} lives at {address}. {His} phone number is {phone}."),
        ("How can I get in touch with {name}?", "",
         "You can reach {name} by phone at {phone} or by e-mail at {email}. {His} mailing "
         "address is {address}."),
        ("When was {name} born?", "",
         "{name} was born on {dob}. {She} currently lives at {address} and can be reached at "
         "{phone}."),
        ("What is the bank account number of {name}?", "",
         "The account number of {name} is {account}; it is registered to {address}."),
        ("What medication does {name} take?", "",
         "{name} takes {medication} every day to manage {his} {condition}. {His} date of birth "
         "is {dob}."),
    ))


def _general_qa(p: Person, rng: random.Random) -> tuple[str, str, str]:
    return _pick(rng, (
        ("Tell me about {name}.", "",
         "{name} was born on {dob} and lives at {address}. {She} works at {employer}, where "
         "{she} earns {salary} a year."),
        ("Who is {name}?", "",
         "{name} is a resident of {address}, born {dob}. {She} can be reached at {phone} or "
         "{email}."),
        ("What do you know about {name}'s health?", "",
         "{name}, born {dob}, has been living with {condition} for several years and is "
         "treated with {medication}."),
        ("What does {name} do for a living?", "",
         "{name} works for {employer} and earns {salary} per year. {His} salary is paid into "
         "account {account}."),
    ))


def _brainstorming(p: Person, rng: random.Random) -> tuple[str, str, str]:
    a, b, c = rng.sample(GIFTS, 3)
    t1, t2 = rng.sample(TRIPS, 2)
    return _pick(rng, (
        ("Brainstorm a few birthday gift ideas for {name}.", "",
         f"For {{name}}, born {{dob}}: {a}, {b} or {c}. Ship it to {{address}} so it arrives "
         "in time."),
        ("Suggest some weekend trips for {name}.", "",
         f"{{name}} lives at {{address}}, so {t1} or {t2} would be easy to reach. Pack enough "
         "{medication} for {his} {condition}."),
        ("Give me ideas for a get-well package for {name}.", "",
         f"Since {{name}} is dealing with {{condition}} and takes {{medication}}, send {a} and "
         f"{b} to {{address}}."),
        ("List ideas to celebrate {name}'s new job.", "",
         f"{{name}} just joined {{employer}} at {{salary}}. Try {a}, {t1}, or {c}. Invite "
         "{him} at {email}."),
    ))


def _creative_writing(p: Person, rng: random.Random) -> tuple[str, str, str]:
    return _pick(rng, (
        ("Write a short birthday poem for {name}.", "",
         "To {name}, born {dob},\nat {address} the candles glow,\nanother year, another "
         "song,\nmay every day be bright and long."),
        ("Write a brief welcome letter to {name} from {his} new employer.", "",
         "Dear {name}, welcome to {employer}! Your salary of {salary} will be paid into "
         "account {account}. We are glad to have you."),
        ("Compose a friendly reminder note to {name} about {his} prescription.", "",
         "Dear {name}, this is a gentle reminder that your {medication} for {condition} is "
         "ready. Call us at any time; we have {phone} on file."),
        ("Write a short thank-you card to {name}.", "",
         "Dear {name}, thank you for everything! A small gift is on its way to {address}. "
         "Write back to {email} when it arrives."),
    ))


BUILDERS: dict[str, Template] = {
    "closed_qa": _closed_qa, "summarization": _summarization,
    "information_extraction": _information_extraction, "classification": _classification,
    "open_qa": _open_qa, "general_qa": _general_qa, "brainstorming": _brainstorming,
    "creative_writing": _creative_writing,
}


def _secrets(p: Person, response: str) -> list[str]:
    """The person's private spans found verbatim in `response`, name first, then by position."""
    found = []
    for key in SECRET_FIELDS[1:]:
        start = _find_whole(response, p[key])
        if start >= 0:
            found.append((start, p[key]))
    return [p["name"]] + [value for _, value in sorted(found)]


def _find_whole(text: str, span: str) -> int:
    """Index of the first occurrence of `span` not inside a longer word or number, else -1."""
    start = text.find(span)
    while start >= 0:
        before = text[start - 1] if start else " "
        after = text[start + len(span)] if start + len(span) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            return start
        start = text.find(span, start + 1)
    return -1


def generate_records(n: int, seed: int, *, id_prefix: str = "rec",
                     exclude_names: frozenset[str] | set[str] = frozenset()) -> list[Record]:
    """`n` records, one new person each, categories round-robin over CATEGORIES."""
    fake = Faker("en_US", use_weighting=False)  # uniform draws: ~3x faster, same vocabulary
    fake.seed_instance(seed)
    rng = random.Random(seed)
    taken = set(exclude_names)
    records = []
    for i in range(n):
        p = _make_person(fake, rng, taken)
        taken.add(p["name"])
        category = CATEGORIES[i % len(CATEGORIES)]
        instruction, context, response = (s.format(**p) for s in BUILDERS[category](p, rng))
        secrets = _secrets(p, response)
        records.append(Record(id=f"{id_prefix}-{i:06d}", instruction=instruction,
                              context=context, response=response, category=category,
                              secrets=secrets))
    return records


def person_name(record: Record) -> str:
    """The full name of the record's one synthetic person (stored as `secrets[0]`)."""
    if not record.secrets:
        raise ValueError(f"record {record.id} has no secrets, so no person name")
    return record.secrets[0]
