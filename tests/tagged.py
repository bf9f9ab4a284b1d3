"""Tagged sentences that drift, for the tiny model (the `ner_sentences` scheme, with recurring names).

A `per` is one word on a positive stem ("gainoku"), an `org` two words on negative stems. Before the
shift half the names come from fixed pools and half are fresh, so held-out sentences repeat about
half their names from training while memorising names still fails on the rest. A shifted sentence
has filler words the tiny vocabulary lacks and only fresh names, half on the old stems (new names
the champion still recognises) and half on stems it never saw tagged ("surgeoku", "crashira"). `new_type` adds a third entity type (a `loc` on the stem "unit"): the tag set grows.
"""

from __future__ import annotations

import numpy as np

from tests.conftest import (FILLER, NEGATIVE_STEMS, NEW_NEGATIVE_STEMS, NEW_POSITIVE_STEMS, POSITIVE_STEMS,
                            SHIFTED_FILLER)

LETTERS = list("aeioukrstnm")


def _name(rng, stems) -> str:
    return str(rng.choice(stems)) + "".join(rng.choice(LETTERS, size=4))


_POOL = np.random.default_rng(12345)
PEOPLE = [_name(_POOL, POSITIVE_STEMS) for _ in range(60)]
ORGS = [[_name(_POOL, NEGATIVE_STEMS), _name(_POOL, NEGATIVE_STEMS)] for _ in range(60)]


def tagged_sentences(n: int, seed: int = 0, shifted: bool = False,
                     new_type: bool = False) -> list[tuple[list[str], list[str]]]:
    rng = np.random.default_rng(seed)

    def person() -> list[str]:
        if not shifted:
            return [str(rng.choice(PEOPLE)) if rng.random() < 0.5 else _name(rng, POSITIVE_STEMS)]
        return [_name(rng, NEW_POSITIVE_STEMS if rng.random() < 0.5 else POSITIVE_STEMS)]

    def org() -> list[str]:
        if not shifted and rng.random() < 0.5:
            return list(ORGS[rng.integers(len(ORGS))])
        stems = NEW_NEGATIVE_STEMS if shifted and rng.random() < 0.5 else NEGATIVE_STEMS
        return [_name(rng, stems), _name(rng, stems)]

    out = []
    for _ in range(n):
        tokens = [str(w) for w in rng.choice(SHIFTED_FILLER if shifted else FILLER, size=rng.integers(3, 8))]
        tags = ["O"] * len(tokens)
        for _ in range(rng.integers(1, 3)):
            at = int(rng.choice([i for i in range(len(tokens) + 1) if i == len(tokens) or tags[i][:2] != "I-"]))
            r = rng.random()
            if new_type and r < 0.3:
                words, kind = [_name(rng, ["unit"])], "loc"
            elif r < 0.65:
                words, kind = person(), "per"
            else:
                words, kind = org(), "org"
            tokens[at:at], tags[at:at] = words, [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        out.append((tokens, tags))
    return out
