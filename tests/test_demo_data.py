import pandas as pd
import pytest

from kftune.demo.data import LABELS, generate, write_batch


def test_batches_are_deterministic_and_distinct():
    a, b = generate(0, 500), generate(0, 500)
    pd.testing.assert_frame_equal(a, b)
    assert len(set(a["text"]) & set(generate(1, 500)["text"])) < 25
    assert set(a["label"]) == set(LABELS)


def test_drift_moves_vocabulary_and_class_priors():
    iid, shifted = generate(0, 3000), generate(0, 3000, drift=1.0)
    new_terms = r"GPU|staking|token|AI |blockchain|Labs|Quantum"
    assert iid["text"].str.contains(new_terms).mean() < 0.02
    assert shifted["text"].str.contains(new_terms).mean() > 0.5
    assert (shifted["label"] == "negative").mean() > (iid["label"] == "negative").mean() + 0.2
    with pytest.raises(ValueError, match="drift=2"):
        generate(0, 10, drift=2)


def test_label_noise_and_negation(tmp_path):
    df = pd.read_csv(write_batch(tmp_path, 3, 4000))
    clean = generate(3, 4000, label_noise=0.0)
    assert (df["text"] == clean["text"]).all()
    assert 0.04 < (df["label"] != clean["label"]).mean() < 0.06
    negated = clean[clean["text"].str.contains("did not miss forecasts|avoided the feared loss")]
    assert len(negated) > 20 and (negated["label"] == "positive").all(), "negated bad news is good news"
