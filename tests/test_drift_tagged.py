"""The drift tests of tagged text on constructed entities whose answer is known."""

import numpy as np
import pytest

from kftune.drift_tests import confidence_test, distribution_test, psi, unseen_entity_test
from kftune.ner import entities


def test_entities_are_typed_lower_cased_surfaces_with_their_mean_word_score():
    tokens = ["Meet", "Ada", "Lovelace", "at", "Acme", "today"]
    tags = ["O", "B-per", "I-per", "O", "B-org", "O"]
    found = entities(tokens, tags, [0.9, 0.8, 0.6, 0.9, 0.5, 1.0])
    assert [(e["type"], e["text"]) for e in found] == [("per", "ada lovelace"), ("org", "acme")]
    assert [e["score"] for e in found] == pytest.approx([0.7, 0.5])
    assert entities(tokens, tags)[0]["score"] is None


def test_unseen_entity_share_rises_only_with_new_names():
    known = {"ada lovelace", "acme", "paris"}
    ref = ["ada lovelace", "acme", "paris", "bob"]  # 1 of 4 unseen
    same = unseen_entity_test(known, ref, ["acme", "paris", "zed", "paris"], 0.1)
    assert same.score == pytest.approx(0.0) and not same.verdict
    moved = unseen_entity_test(known, ref, ["zed", "qux", "zed", "acme"], 0.1)  # 3 of 4 unseen
    assert moved.score == pytest.approx(0.5) and moved.verdict
    assert moved.details["top_unseen"] == ["zed", "qux"] and moved.details["new_unseen_share"] == 0.75
    assert unseen_entity_test(known, [], [], 0.1).score == 0, "no entity on either side: no rise"


def test_entity_type_psi_has_the_known_value_and_a_side_without_entities_still_scores():
    ref = ["per"] * 50 + ["org"] * 50
    moved = distribution_test("prediction", ref, ["per"] * 90 + ["org"] * 10, ["org", "per"], 0.2, 0.05)
    assert moved.score == pytest.approx(psi(np.array([50.0, 50.0]), np.array([10.0, 90.0]))) and moved.verdict
    assert moved.details["new"] == {"org": 0.1, "per": 0.9}
    nothing = distribution_test("prediction", ref, [], ["org", "per"], 0.2, 0.05)
    assert nothing.verdict and nothing.p_value is None, "a tagger that stopped finding entities"


def test_confidence_on_entity_means_and_an_empty_side():
    rng = np.random.default_rng(0)
    high, low = rng.uniform(0.8, 1.0, 200), rng.uniform(0.4, 0.7, 200)
    assert confidence_test(high, low, 0.05).verdict
    assert not confidence_test(high, rng.uniform(0.8, 1.0, 200), 0.01).verdict
    empty = confidence_test(high, np.array([]), 0.05)
    assert not empty.verdict and empty.p_value == 1.0 and empty.details["new_mean"] is None
