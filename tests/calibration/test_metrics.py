import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics

from calibration.metrics import auroc, best_f1, pixel_auroc, pro_score, roc_curve, weakness


def test_auroc_hand_computed_with_ties() -> None:
    # Pairs (pos, neg): pos scores 0.8, 0.4; neg scores 0.4, 0.1.
    # 0.8 > 0.4, 0.8 > 0.1, 0.4 == 0.4 (1/2), 0.4 > 0.1 -> 3.5 / 4.
    assert auroc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert auroc([1, 0], [1.0, 0.0]) == 1.0
    assert auroc([1, 0], [0.0, 1.0]) == 0.0
    assert auroc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)


def test_auroc_equals_mann_whitney_on_random_data() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding creates many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    u = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(labels, scores) == pytest.approx(u / (pos.size * neg.size))


def test_roc_curve_points() -> None:
    fpr, tpr, thr = roc_curve([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.6])
    assert np.allclose(fpr, [0, 0, 0.5, 1]) and np.allclose(tpr, [0, 0.5, 1, 1])
    assert np.isinf(thr[0]) and np.allclose(thr[1:], [0.9, 0.6, 0.1])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        roc_curve([1, 1], [0.1, 0.2])


def test_best_f1_hand_computed() -> None:
    # Thresholding at >= 0.6: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8; at >= 0.9: P 1, R 1/2, F1 2/3.
    f1, t = best_f1([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.6])
    assert f1 == pytest.approx(0.8) and t == pytest.approx(0.6)


def test_pixel_auroc_over_all_pixels() -> None:
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = True
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1.0
    maps[1, 1, 1] = 1.0  # a tie with the positive pixel: 7 negatives, one tied -> 6.5 / 7
    assert pixel_auroc(masks, maps) == pytest.approx(6.5 / 7)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_auroc(masks, maps[:1])


def test_pro_hand_computed() -> None:
    # One image 1 x 10: region A = pixels 0-1, region B = pixels 5-8; 4 normal pixels.
    masks = np.zeros((1, 1, 10), bool)
    masks[0, 0, [0, 1]] = True
    masks[0, 0, 5:9] = True
    maps = np.array([[[0.9, 0.2, 0.3, 0.1, 0.1, 0.8, 0.8, 0.8, 0.8, 0.1]]])
    # Sweep: t=0.9 -> A 1/2, B 0 -> PRO 0.25, FPR 0; t=0.8 -> B 1 -> PRO 0.75, FPR 0;
    # t=0.3 -> FPR 1/4 (pixel 2), PRO 0.75; t=0.2 -> A complete, PRO 1, FPR 1/4; t=0.1 -> FPR 1.
    # Up to FPR 0.3: area = 0.25 * 0.75 (0..1/4) + interpolate between (1/4, 1.0) and (1, 1.0) -> 0.05 * 1.0.
    expected = (0.25 * 0.75 + 0.05 * 1.0) / 0.3
    assert pro_score(masks, maps, max_fpr=0.3) == pytest.approx(expected)


def test_pro_perfect_and_errors() -> None:
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 5:7, 1:3] = True
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one anomalous region"):
        pro_score(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.0, float("nan")])


# Cross-checks against scikit-learn (a dev-only dependency) on random data. Each case draws labels and scores;
# "ties" and "heavy_ties" round the scores so that many positives and negatives share a score, "imbalanced"
# has ~1 % positives and "rare_negatives" ~1 % negatives (each case keeps at least one of each class).
CASES = ["continuous", "ties", "heavy_ties", "imbalanced", "rare_negatives", "one_positive"]
SEEDS = [0, 1, 2, 3, 4]


def random_case(case: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, CASES.index(case)])
    n = 2000 if case in ("imbalanced", "rare_negatives") else 400
    p = {"imbalanced": 0.01, "rare_negatives": 0.99}.get(case, 0.4)
    labels = (rng.random(n) < p).astype(np.int64)
    if case == "one_positive":
        labels[:] = 0
    labels[0], labels[1] = 1, 0  # both classes present
    scores = rng.normal(labels * 0.8, 1.0)
    if case == "ties":
        scores = np.round(scores, 1)
    elif case == "heavy_ties":
        scores = np.clip(np.round(scores), -1, 2)  # four distinct values
    return labels, scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES)
def test_auroc_matches_sklearn(case: str, seed: int) -> None:
    labels, scores = random_case(case, seed)
    assert auroc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES)
def test_roc_curve_matches_sklearn(case: str, seed: int) -> None:
    labels, scores = random_case(case, seed)
    fpr, tpr, thr = roc_curve(labels, scores)
    ref_fpr, ref_tpr, ref_thr = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])  # sklearn's first threshold is a sentinel above the max


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES)
def test_best_f1_matches_sklearn(case: str, seed: int) -> None:
    labels, scores = random_case(case, seed)
    f1, t = best_f1(labels, scores)
    precision, recall, _ = sklearn_metrics.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    assert f1 == pytest.approx(ref.max(), abs=1e-12)
    # the returned threshold achieves it, with "positive means score >= t"
    assert sklearn_metrics.f1_score(labels, scores >= t) == pytest.approx(f1, abs=1e-12)


def random_maps(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """(masks, maps) (N, H, W): a few rectangular defects (~2 % of pixels, one image clean), noisy maps."""
    rng = np.random.default_rng([seed, 100 + ties])
    masks = np.zeros((5, 48, 48), bool)
    for i in range(4):  # image 4 stays defect-free
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, 40, 2)
            h, w = rng.integers(2, 7, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.normal(masks * 1.2, 1.0).astype(np.float32)
    if ties:
        maps = np.round(maps * 4) / 4  # ~30 distinct values over 11,520 pixels
    return masks, maps


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_auroc_matches_sklearn(seed: int, ties: bool) -> None:
    masks, maps = random_maps(seed, ties)
    assert 0.005 < masks.mean() < 0.05  # imbalanced: few anomalous pixels
    expected = sklearn_metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_all_scores_tied_match_sklearn() -> None:
    labels = np.r_[np.ones(3, int), np.zeros(97, int)]
    scores = np.full(100, 0.25)
    assert auroc(labels, scores) == sklearn_metrics.roc_auc_score(labels, scores) == 0.5
    f1, t = best_f1(labels, scores)
    assert t == 0.25 and f1 == pytest.approx(sklearn_metrics.f1_score(labels, scores >= t), abs=1e-12)


def test_weakness_names_each_figure_below_the_bar_and_nothing_else() -> None:
    assert weakness("padim", {"image AUROC": 0.95, "pixel AUROC": None}) is None
    assert weakness("padim", {}) is None
    line = weakness("padim", {"image AUROC": 0.686, "pixel AUROC": 0.767, "PRO": 0.95})
    assert line is not None and "\n" not in line
    assert line.startswith("padim detects poorly on this data: image AUROC 0.686, pixel AUROC 0.767 (below 0.90)")
    assert "PRO" not in line
