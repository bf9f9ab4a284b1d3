"""A deterministic, noisy 3-class financial-headline corpus, in batches that can drift.

Half the headlines report a metric moving ("X's operating costs in the third quarter rose 12%"):
the label is the product of the metric's polarity (profit good, costs bad) and the direction,
an interaction that word counts cannot capture but a fine-tuned encoder learns. The rest are
event clauses of the label's polarity, sometimes negated ("did not miss forecasts" is positive)
or set against a concessive clause of the other polarity ("Despite weak demand, X raised its
outlook"), with filler of varied length. `drift` in [0, 1] mixes in new sectors, companies and
jargon, and moves the class priors from mostly neutral towards mostly negative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

LABELS = ("negative", "neutral", "positive")
PRIORS = {0.0: (0.25, 0.45, 0.30), 1.0: (0.55, 0.25, 0.20)}

_SYL = ["ar", "bel", "cor", "dan", "el", "fin", "gor", "hal", "in", "jor", "kel", "lum", "mar", "nor", "or", "pel",
        "quin", "ros", "sal", "tor", "ul", "ven", "wes", "xan", "yor", "zel"]
_SUFFIX = ["Group", "Holdings", "Corp", "Oyj", "AB", "Industries", "Systems", "Bank", "Energy", "Foods"]
_NEW_SUFFIX = ["AI", "Labs", "Chain", "Quantum", "Robotics", "Networks"]

POSITIVE = {
    "old": ["raised its full-year outlook", "beat analyst forecasts", "reported record quarterly sales",
            "won a major supply contract", "posted a jump in operating profit", "increased its dividend",
            "swung to a net profit", "saw orders climb sharply", "lifted its margin guidance",
            "secured new long-term financing on better terms", "grew net sales by double digits",
            "exceeded its own earnings target", "expanded market share in Europe", "boosted cash flow",
            "upgraded its profit forecast", "delivered stronger than expected results"],
    "new": ["cleared its GPU backlog ahead of schedule", "saw staking revenue surge", "landed a sovereign AI cloud deal",
            "doubled token transaction volumes", "reported a spike in inference workloads"],
}
NEGATIVE = {
    "old": ["cut its full-year outlook", "missed analyst forecasts", "reported a slump in quarterly sales",
            "lost a key supply contract", "posted a drop in operating profit", "suspended its dividend",
            "swung to a net loss", "saw orders fall sharply", "lowered its margin guidance",
            "breached its loan covenants", "announced hundreds of layoffs", "issued a profit warning",
            "lost market share in Europe", "burned through its cash reserves",
            "downgraded its profit forecast", "delivered weaker than expected results"],
    "new": ["was hit by a GPU supply shortage", "saw staking revenue collapse", "lost a sovereign AI cloud deal",
            "suffered a smart-contract exploit", "halted withdrawals after a token crash"],
}
NEUTRAL = {
    "old": ["will publish its interim report on Thursday", "appointed a new chief financial officer",
            "will hold its annual general meeting in April", "moved its headquarters to a new office",
            "said its share count was unchanged", "completed a previously announced name change",
            "confirmed the date of its capital markets day", "listed new bonds on the exchange",
            "said the board will meet next week", "published its sustainability report",
            "renewed the mandate of its auditor", "registered a new subsidiary"],
    "new": ["migrated its ledger to a new blockchain", "opened a developer conference in Lisbon",
            "published an updated token whitepaper", "joined an industry AI safety consortium"],
}
# Negating a clause flips its polarity; the flip of a neutral clause stays neutral.
NEGATED = {
    "positive": ["did not meet its sales target", "failed to win the tender", "could not sustain its growth",
                 "did not raise its dividend as expected"],
    "negative": ["did not miss forecasts this time", "avoided the feared loss", "did not cut jobs as feared",
                 "escaped a downgrade by the rating agency"],
}
CONCESSIVE = {
    "positive": ["Despite weak demand in Asia", "Although raw material costs rose",
                 "Even as rivals cut prices", "In spite of a tough quarter"],
    "negative": ["Despite strong demand in the US", "Although sales rose", "Even after winning new contracts",
                 "In spite of record orders"],
}
GOOD_METRICS = {"old": ["net sales", "operating profit", "order intake", "net profit", "EBIT", "revenue",
                        "gross margin", "market share", "operating cash flow", "dividend per share"],
                "new": ["GPU utilisation", "staking rewards", "paid API subscriptions", "hash rate"]}
BAD_METRICS = {"old": ["operating costs", "net loss", "net debt", "credit losses", "customer churn",
                       "impairment charges", "raw material costs", "interest expenses", "inventory write-downs"],
               "new": ["token outflows", "validator slashing penalties", "GPU idle time", "bridge exploit losses"]}
UP = ["rose", "increased", "climbed", "jumped", "grew", "surged", "edged up", "doubled"]
DOWN = ["fell", "declined", "dropped", "decreased", "slumped", "shrank", "edged down", "halved"]
FLAT = ["was unchanged", "stayed flat", "held steady", "was stable"]
QUALIFIER = ["in the third quarter", "for January-March", "at the Finnish unit", "year-on-year",
             "in the reporting period", "compared with a year earlier", "in the second half", "last month"]
PREFIX = ["", "", "", "UPDATE 1-", "BRIEF-", "Market wrap: "]
SUFFIX = ["", "", "", ", the company said", ", according to a stock exchange release", " in early trading",
          ", analysts said", ", sending its shares sharply in the opposite direction of the market",
          ", the company said in a statement on Monday, adding that it would give more details later"]


def _company(rng: np.random.Generator, new: bool) -> str:
    name = "".join(rng.choice(_SYL, size=rng.integers(2, 4))).capitalize()
    return f"{name} {rng.choice(_NEW_SUFFIX if new else _SUFFIX)}"


def _metric_headline(rng: np.random.Generator, label: str, new: bool) -> str:
    vocab = "new" if new and rng.random() < 0.7 else "old"
    good = rng.random() < 0.5
    metric = rng.choice((GOOD_METRICS if good else BAD_METRICS)[vocab])
    if label == "neutral":
        move = rng.choice(FLAT)
    else:
        move = rng.choice(UP if (label == "positive") == good else DOWN)
        move += f" {rng.integers(2, 60)}%" if rng.random() < 0.6 else ""
    company = _company(rng, new)
    owner = f"{company}'" if company.endswith("s") else f"{company}'s"
    return f"{owner} {metric} {rng.choice(QUALIFIER)} {move}"


def _headline(rng: np.random.Generator, label: str, new: bool) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(PREFIX)}{_metric_headline(rng, label, new)}{rng.choice(SUFFIX)}"
    pool = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    clauses = pool["new"] if new and rng.random() < 0.7 else pool["old"]
    company = _company(rng, new)
    r = rng.random()
    if label != "neutral" and r < 0.2:  # a negated clause of the opposite polarity
        clause = rng.choice(NEGATED["negative" if label == "positive" else "positive"])
        text = f"{company} {clause}"
    elif label != "neutral" and r < 0.4:
        text = f"{rng.choice(CONCESSIVE[label])}, {company} {rng.choice(clauses)}"
    else:
        text = f"{company} {rng.choice(clauses)}"
    return f"{rng.choice(PREFIX)}{text}{rng.choice(SUFFIX)}"


def generate(batch: int, rows: int, drift: float = 0.0, seed: int = 7, label_noise: float = 0.05) -> pd.DataFrame:
    """One batch of headlines; the same (seed, batch, rows, drift) always gives the same rows.

    Args:
        batch: batch number; different batches draw different companies and phrasings.
        rows: number of rows.
        drift: 0 for the original distribution, 1 for fully shifted vocabulary and priors.
        seed: corpus seed.
        label_noise: share of labels replaced by a random other label.
    """
    if not 0 <= drift <= 1:
        raise ValueError(f"drift={drift}: must be in [0, 1]")
    rng = np.random.default_rng([seed, batch])
    priors = (1 - drift) * np.array(PRIORS[0.0]) + drift * np.array(PRIORS[1.0])
    labels = rng.choice(LABELS, size=rows, p=priors)
    texts = [_headline(rng, lbl, new=rng.random() < drift) for lbl in labels]
    flip = rng.random(rows) < label_noise
    noisy = [rng.choice([x for x in LABELS if x != lbl]) if f else lbl for lbl, f in zip(labels, flip)]
    return pd.DataFrame({"text": texts, "label": noisy})


def write_batch(out_dir: str | Path, batch: int, rows: int, drift: float = 0.0, seed: int = 7) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"batch-{batch:03d}.csv"
    generate(batch, rows, drift, seed).to_csv(path, index=False)
    return path


# --- tagged sentences (token classification) ---------------------------------------------------
# News-wire sentences about people, organisations and places; `drift` brings new names (start-up
# founders, AI and crypto firms, other cities) in a new context (chat and social-media phrasing).
# Old names come from fixed pools, so an i.i.d. batch mostly repeats names a champion has seen
# and a shifted one mostly does not. Every batch has all three types: the tag set never changes.
TAGS = ("O", "B-loc", "I-loc", "B-org", "I-org", "B-per", "I-per")
_FIRST = {"old": ["Anna", "Mikko", "Laura", "Jukka", "Sari", "Pekka", "Elina", "Timo", "Heidi", "Olli", "Maria",
                  "Antti", "Kaisa", "Juha", "Riikka", "Ville", "Paula", "Markku", "Tiina", "Harri"],
          "new": ["Zara", "Kenji", "Amara", "Diego", "Priya", "Tobias", "Leilani", "Rafael", "Noor", "Sven",
                  "Ayumi", "Kwame", "Ines", "Bodhi", "Yara", "Mateo"]}
_LAST = {"old": ["Virtanen", "Korhonen", "Nieminen", "Makinen", "Hamalainen", "Laine", "Heikkinen", "Koskinen",
                 "Jarvinen", "Lehtonen", "Salminen", "Lindqvist", "Berg", "Holm", "Strand"],
         "new": ["Okafor", "Tanaka", "Castellanos", "Raghunathan", "Moreau", "Adeyemi", "Kowalczyk", "Nakamura",
                 "Oyelaran", "Vasquez", "Haddad", "Takahashi"]}
_PLACES = {"old": ["Helsinki", "Tampere", "Espoo", "Oulu", "Turku", "Stockholm", "Oslo", "Copenhagen", "Vaasa",
                   "Lahti", "Gothenburg", "Bergen", "New York", "Frankfurt"],
           "new": ["Lisbon", "Nairobi", "Seoul", "Austin", "Bangalore", "Lagos", "Singapore", "Tallinn", "Medellin",
                   "Shenzhen", "Cape Town", "Buenos Aires"]}
_OLD_CONTEXTS = [
    "{per} , chief executive of {org} , said in {loc} on Monday that demand had stabilised .",
    "{org} appointed {per} as its new finance director , the company said in {loc} .",
    "Shares in {org} rose after {per} told reporters in {loc} that orders were strong .",
    "{per} will lead the {loc} unit of {org} from the start of next year .",
    "According to {per} , {org} plans to close its factory in {loc} .",
    "The board of {org} met in {loc} to discuss the proposal by {per} .",
    "{org} said {per} had resigned from the board with immediate effect .",
    "Analysts in {loc} expect {org} to report higher profits , {per} said .",
]
_NEW_CONTEXTS = [
    "ngl {per} just dropped a new demo from {org} and it slaps",
    "anyone else watching {per} stream live from {loc} rn ?",
    "lol {org} really hired {per} to run their {loc} hub",
    "big if true : {per} leaving {org} for a stealth startup in {loc}",
    "{org} discord is down again , {per} says fix is coming",
    "just met {per} from {org} at the meetup in {loc} , super chill",
    "hot take : {org} is overrated and {per} knows it",
    "who is going to the {org} hackathon in {loc} with {per} ?",
]


def _name_pools(seed: int) -> dict:
    """Fixed pools of people, organisations and places per vocabulary (the same in every batch)."""
    rng = np.random.default_rng([seed, 9999])
    pools = {}
    for vocab in ("old", "new"):
        people = [f"{f} {last}" for f in _FIRST[vocab] for last in _LAST[vocab]]
        orgs = sorted({_company(rng, new=vocab == "new") for _ in range(60)})
        pools[vocab] = {"per": people, "org": orgs, "loc": _PLACES[vocab]}
    return pools


def _tagged_sentence(rng: np.random.Generator, pools: dict, new: bool) -> tuple[list[str], list[str]]:
    vocab = "new" if new else "old"
    template = str(rng.choice(_NEW_CONTEXTS if new else _OLD_CONTEXTS))
    tokens, tags = [], []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            names = str(rng.choice(pools[vocab][kind])).split()
            tokens += names
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(names) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return tokens, tags


def generate_tagged(batch: int, rows: int, drift: float = 0.0, seed: int = 7) -> list[tuple[list[str], list[str]]]:
    """One batch of tagged sentences (tokens, IOB2 tags); the same arguments always give the same sentences.

    Args:
        batch: batch number; different batches draw different sentences from the same pools.
        rows: number of sentences.
        drift: share of sentences with new names in the new (chat) context; 0 is i.i.d.
        seed: corpus seed.
    """
    if not 0 <= drift <= 1:
        raise ValueError(f"drift={drift}: must be in [0, 1]")
    rng, pools = np.random.default_rng([seed, batch, 1]), _name_pools(seed)
    return [_tagged_sentence(rng, pools, new=rng.random() < drift) for _ in range(rows)]


def write_tagged_batch(out_dir: str | Path, batch: int, rows: int, drift: float = 0.0, seed: int = 7) -> Path:
    """The batch as a CoNLL file (token TAB tag, a blank line between sentences)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"batch-{batch:03d}.conll"
    sentences = generate_tagged(batch, rows, drift, seed)
    path.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(*s)) for s in sentences) + "\n",
                    encoding="utf-8")
    return path
