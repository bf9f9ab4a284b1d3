"""Two-sample drift tests: pure numpy/scipy functions of a reference sample and a new one.

Every test returns a `Check` (score, threshold or p-value, verdict) so the drift step can log,
report and vote on them uniformly. Seeded wherever there is randomness.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

EPS = 1e-4  # floor for empty bins in PSI, so a category absent on one side gives a large, finite score


@dataclass
class Check:
    method: str
    score: float  # the statistic compared with the threshold (or whose p-value is)
    threshold: float  # drift when score > threshold, or when p_value < threshold if p_value is set (unless `rule`)
    verdict: bool
    p_value: float | None = None
    details: dict = field(default_factory=dict)
    rule: str = ""  # the decision rule in words (default: from threshold and p_value)

    def __post_init__(self):
        self.rule = self.rule or (f"p < {self.threshold:g}" if self.p_value is not None else f"> {self.threshold:g}")

    def to_dict(self) -> dict:
        return asdict(self)


def _rbf_kernel(z: np.ndarray, bandwidth: float) -> np.ndarray:
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    return np.exp(-d2 / (2 * bandwidth**2), dtype=np.float32)


def median_bandwidth(z: np.ndarray, seed: int, sample: int = 1000) -> float:
    """Median pairwise distance of a seeded subsample (the usual heuristic for the RBF width)."""
    rng = np.random.default_rng(seed)
    s = z[rng.choice(len(z), size=min(sample, len(z)), replace=False)]
    d = np.sqrt(np.maximum((s * s).sum(1)[:, None] + (s * s).sum(1)[None, :] - 2 * s @ s.T, 0))
    med = float(np.median(d[np.triu_indices(len(s), 1)]))
    return med if med > 0 else 1.0


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, alpha: float, seed: int) -> Check:
    """Kernel MMD two-sample test (RBF, median bandwidth) with a permutation p-value.

    MMD^2 is w' K w with w = +1/m on x and -1/n on y, so all permutations are one matrix product
    K @ W: 5,000 + 5,000 embeddings and 500 permutations take a few seconds.
    """
    m, n = len(x), len(y)
    if not m or not n:  # nothing to compare on one side: no drift, as confidence_test says
        return Check("embedding", 0.0, alpha, False, 1.0, {"reference": m, "new": n, "empty": True})
    z = np.concatenate([x, y]).astype(np.float32)
    bandwidth = median_bandwidth(z, seed)
    k = _rbf_kernel(z, bandwidth)
    rng = np.random.default_rng(seed)
    w = np.empty((m + n, permutations + 1), dtype=np.float32)
    base = np.r_[np.full(m, 1 / m), np.full(n, -1 / n)].astype(np.float32)
    w[:, 0] = base
    for j in range(1, permutations + 1):
        w[:, j] = base[rng.permutation(m + n)]
    stats = np.einsum("ij,ij->j", w, k @ w)
    observed = float(stats[0])
    # float32 sums: a permutation within rounding of the observed value counts as reaching it (identical
    # samples must not flag drift on rounding error)
    p = float((1 + (stats[1:] >= observed - 1e-6).sum()) / (1 + permutations))
    return Check("embedding", observed, alpha, p < alpha, p,
                 {"mmd2": observed, "bandwidth": bandwidth, "permutations": permutations, "reference": m, "new": n})


def psi(ref_counts: np.ndarray, new_counts: np.ndarray) -> float:
    """Population stability index between two histograms over the same categories."""
    p = np.maximum(ref_counts / max(ref_counts.sum(), 1), EPS)
    q = np.maximum(new_counts / max(new_counts.sum(), 1), EPS)
    return float(((q - p) * np.log(q / p)).sum())


def chi2_p(ref_counts: np.ndarray, new_counts: np.ndarray) -> float:
    """Chi-squared test of homogeneity on a 2 x K table (categories empty on both sides dropped)."""
    from scipy.stats import chi2_contingency

    table = np.stack([ref_counts, new_counts])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table)[1])


def distribution_test(method: str, ref: list, new: list, categories: list, psi_threshold: float,
                      alpha: float) -> Check:
    """Category shift (predicted labels, true labels): drift when PSI > psi_threshold and the chi-squared test
    of homogeneity is significant (p < alpha). PSI alone grows with the number of categories and shrinks
    with the sample: 50 rows over 20 labels drawn from the reference's own shares pass 0.2 almost always."""
    rc = Counter(ref)
    nc = Counter(new)
    ref_counts = np.array([rc[c] for c in categories], dtype=float)
    new_counts = np.array([nc[c] for c in categories], dtype=float)
    score = psi(ref_counts, new_counts)
    share = lambda counts: {str(c): round(float(v / max(counts.sum(), 1)), 4) for c, v in zip(categories, counts)}  # noqa: E731
    both = ref_counts.sum() > 0 and new_counts.sum() > 0  # a tagger may find no entity at all on one side
    p = chi2_p(ref_counts, new_counts) if both else None
    return Check(method, score, psi_threshold, score > psi_threshold and (p is None or p < alpha), p,
                 {"reference": share(ref_counts), "new": share(new_counts)},
                 rule=f"> {psi_threshold:g} and chi-squared p < {alpha:g}")


def confidence_test(ref_conf: np.ndarray, new_conf: np.ndarray, alpha: float) -> Check:
    """Kolmogorov-Smirnov test on the model's top-class probability (tagged text: each entity's mean).

    A side without any value (a tagger that found no entity) cannot be compared: no drift, p = 1.
    """
    from scipy.stats import ks_2samp

    if not len(ref_conf) or not len(new_conf):
        return Check("confidence", 0.0, alpha, False, 1.0, {"reference_mean": float(np.mean(ref_conf)) if len(ref_conf)
                                                            else None, "new_mean": float(np.mean(new_conf))
                                                            if len(new_conf) else None, "empty": True})
    res = ks_2samp(ref_conf, new_conf)
    return Check("confidence", float(res.statistic), alpha, bool(res.pvalue < alpha), float(res.pvalue),
                 {"reference_mean": float(np.mean(ref_conf)), "new_mean": float(np.mean(new_conf))})


WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def oov_rate(texts: list[str], vocabulary: set[str]) -> float:
    """Share of word tokens not in `vocabulary`."""
    tokens = [w for t in texts for w in words(t)]
    return sum(w not in vocabulary for w in tokens) / max(len(tokens), 1)


def vocabulary_test(train_texts: list[str], ref_texts: list[str], new_texts: list[str], max_increase: float,
                    unk_rates: tuple[float, float] | None = None) -> Check:
    """Rise in the share of words never seen in the champion's training texts.

    Both sides are measured against the same vocabulary, and the reference side is held-out text,
    so i.i.d. new data has the same expected rate and only new words move the score.
    """
    vocab = {w for t in train_texts for w in words(t)}
    ref_rate, new_rate = oov_rate(ref_texts, vocab), oov_rate(new_texts, vocab)
    details = {"reference_oov_rate": ref_rate, "new_oov_rate": new_rate, "vocabulary_size": len(vocab)}
    if unk_rates:
        details.update(reference_unk_token_rate=unk_rates[0], new_unk_token_rate=unk_rates[1])
    new_words = Counter(w for t in new_texts for w in words(t) if w not in vocab)
    details["top_new_words"] = [w for w, _ in new_words.most_common(10)]
    return Check("vocabulary", new_rate - ref_rate, max_increase, new_rate - ref_rate > max_increase, None, details)


def unseen_entity_test(known: set[str], ref_surfaces: list[str], new_surfaces: list[str],
                       max_increase: float) -> Check:
    """Rise in the share of predicted entities whose surface form was never an entity in training.

    `known` holds the training rows' gold entity surfaces; both sides are the champion's predictions
    (on held-out reference rows and on the new rows), so i.i.d. data has the same expected share and
    only new names move the score. A side without entities has share 0.
    """
    share = lambda s: sum(x not in known for x in s) / len(s) if s else 0.0  # noqa: E731
    ref_share, new_share = share(ref_surfaces), share(new_surfaces)
    unseen = Counter(x for x in new_surfaces if x not in known)
    return Check("entities", new_share - ref_share, max_increase, new_share - ref_share > max_increase, None,
                 {"reference_unseen_share": ref_share, "new_unseen_share": new_share, "known_surfaces": len(known),
                  "reference_entities": len(ref_surfaces), "new_entities": len(new_surfaces),
                  "top_unseen": [x for x, _ in unseen.most_common(10)]})
