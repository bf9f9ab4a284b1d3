"""Masking on a corpus of realistic PII and look-alikes: every PII span masked with its type, nothing else."""

from kftune.pii import PLACEHOLDERS, find_pii, iban_ok, luhn_ok, mask, mask_tokens
from tests.monitor.pii_corpus import NEGATIVE, POSITIVE


def corpus_scores() -> dict:
    """Span-level recall and precision over the corpus (a span counts when text and kind both match)."""
    expected, found = set(), set()
    for i, (text, spans) in enumerate(POSITIVE):
        expected |= {(i, s, k) for s, k in spans}
        found |= {(i, text[a:b], k) for a, b, k in find_pii(text)}
    for j, text in enumerate(NEGATIVE):
        found |= {(1000 + j, text[a:b], k) for a, b, k in find_pii(text)}
    hit = len(expected & found)
    return {"recall": hit / len(expected), "precision": hit / max(len(found), 1), "spans": len(expected),
            "missed": sorted(expected - found), "wrong": sorted(found - expected)}


def test_masking_on_the_pii_corpus_finds_every_span_and_no_look_alike():
    s = corpus_scores()
    print(f"PII corpus: {s['spans']} spans, {len(NEGATIVE)} look-alikes: recall {s['recall']:.3f}, "
          f"precision {s['precision']:.3f}")
    assert s["missed"] == [] and s["wrong"] == [], s
    assert s["recall"] == 1.0 and s["precision"] == 1.0


def test_mask_replaces_spans_with_typed_placeholders_and_keeps_the_rest():
    text, spans = POSITIVE[-2]
    out = mask(text)
    assert out == "write to <EMAIL> or call <PHONE>"
    for t in NEGATIVE:
        assert mask(t) == t
    assert mask("") == "" and set(PLACEHOLDERS.values()) >= {"<EMAIL>", "<CARD>", "<IBAN>"}


def test_an_ip_address_ending_a_sentence_is_masked():
    assert mask("My IP is 10.1.2.3. Thanks") == "My IP is <IP>. Thanks"
    assert mask("version 1.2.3.4.5") == "version 1.2.3.4.5"


def test_a_tagged_sentences_pii_is_found_across_its_tokens_and_the_tokens_stay_aligned():
    tokens = "Call Ann on 555 123 4567 or +44 20 7946 0958 , IBAN DE89 3704 0044 0532 0130 00 ( mail:ann@example.com )".split()
    out = mask_tokens(tokens)
    assert len(out) == len(tokens) and not any(c.isdigit() for t in out for c in t)
    assert out[:4] == ["Call", "Ann", "on", "<PHONE>"] and out[-2] == "mail:<EMAIL>"
    assert out[13:19] == ["<IBAN>"] * 6 and out[7:11] == ["<PHONE>"] * 4
    assert mask_tokens(["no", "pii", "here"]) == ["no", "pii", "here"]


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB83 WEST 1234 5698 7654 32")
