"""The tagged-sentence generator of `kftune demo-drift --task token-classification`, and its timeline."""

from kftune.demo.data import TAGS, generate_tagged, write_tagged_batch
from kftune.demo.drift import format_timeline
from kftune.ner import entities, read_conll, tag_set


def names(sentences) -> set[str]:
    return {e["text"] for tokens, tags in sentences for e in entities(tokens, tags)}


def test_batches_are_deterministic_valid_iob2_with_the_fixed_tag_set(tmp_path):
    assert generate_tagged(1, 50) == generate_tagged(1, 50) != generate_tagged(2, 50)
    for drift in (0.0, 1.0):
        batch = generate_tagged(0, 300, drift=drift)
        assert tag_set([t for _, tags in batch for t in tags]) == list(TAGS), "every batch has every type"
    path = write_tagged_batch(tmp_path, 3, 40, drift=1.0)
    assert path.name == "batch-003.conll" and [s.tokens for s in read_conll(path, -1)] == \
        [tokens for tokens, _ in generate_tagged(3, 40, drift=1.0)]


def test_iid_batches_repeat_names_and_the_shifted_one_brings_new_names_and_words():
    old, iid, shifted = generate_tagged(0, 800), generate_tagged(1, 300), generate_tagged(3, 300, drift=1.0)
    seen = names(old)
    assert len(names(iid) - seen) / len(names(iid)) < 0.6
    assert not names(shifted) & seen, "the shifted batch's people, organisations and places are all new"
    words = lambda batch: {w.lower() for tokens, tags in batch for w, t in zip(tokens, tags) if t == "O"}  # noqa: E731
    assert len(words(shifted) - words(old)) > 30 and len(words(iid) - words(old)) == 0, "a new context"


def test_the_tagged_timeline_shows_the_unseen_entity_rise():
    row = {"batch": 3, "shift": 1.0, "new_rows": 500, "drift": "true", "retrain": "retrain",
           "challenger_version": "2", "decision": "promote", "champion": "2", "champion_f1_before": 0.41,
           "champion_f1_after": 0.88, "drift_scores": {"embedding_p_value": 0.002, "label_score": 0.01,
                                                      "vocabulary_score": 0.3, "entities_score": 0.62}}
    text = format_timeline([row], tagged_text=True)
    assert "entity F1" in text and "ENT+" in text.splitlines()[1]
    assert text.splitlines()[-1].split()[:8] == ["3", "1.0", "500", "true", "0.002", "0.010", "0.300", "0.620"]
    assert "ENT+" not in format_timeline([row]), "the classification timeline is unchanged"
