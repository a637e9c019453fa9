"""report.html (Jinja2, autoescaped) and its PNG figures, from a Calibration built by hand (no model fit)."""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.calibrate import Calibration, Example, LabelledCheck, Rate, separation
from calibration.evaluate import ScoredSet
from calibration.metrics import auroc
from calibration.plots import curve_figure, histogram_figure, save_figure
from calibration.report import FIGURES, write_report
from calibration.threshold import choose_threshold
from edge.manifest import BackboneRecord, BundleManifest, DatasetRecord
from edge.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[2]
HOSTILE_PATH = Path('/data/<script>alert("owned")</script>/line & co/m.pt')
HOSTILE_MODEL = "patchcore<img src=x onerror=alert(1)>"
HOSTILE_KIND = "<b>stain</b>"
TAB_BLUE, TAB_RED = (31, 119, 180), (214, 39, 40)  # the first two series colours, RGB


def build(
    *,
    weak: bool = False,
    synthetic: bool = True,
    labelled: bool = True,
    examples: bool = True,
    model: str = "patchcore",
    kind: str = "stain",
    seed: int = 0,
    defect_mean: float = 2.0,
) -> Calibration:
    """A Calibration as calibrate() returns it, with random scores; `fit` is not read by the report."""
    rng = np.random.default_rng(seed)
    holdout = rng.gamma(4.0, 0.25, 40)
    if weak:  # 1 % at 95 % needs 299 frames: 40 give the weak bound
        choice = choose_threshold(holdout, 0.01, 0.95, allow_weak_bound=True)
    else:  # 20 % at 80 % needs 8
        choice = choose_threshold(holdout, 0.2, 0.8)
    t = choice.threshold
    synthetic_scores = {k: rng.normal(defect_mean, 0.6, 6) for k in ("scratch", kind)} if synthetic else {}
    recall = [Rate(k, int((s > t).sum()), s.size) for k, s in synthetic_scores.items()]
    check = None
    if labelled:
        labels = np.r_[np.zeros(10, int), np.ones(12, int)]
        scores = np.r_[rng.gamma(4.0, 0.25, 10), rng.normal(defect_mean, 0.6, 12)]
        kinds = ["good"] * 10 + ["crack"] * 6 + ["hole"] * 6
        scored = ScoredSet(labels, scores, np.zeros((22, 8, 8), np.float32), None, np.ones(22), kinds)
        rejected = scores > t
        check = LabelledCheck(
            scored=scored,
            fpr=Rate("good", int(rejected[:10].sum()), 10),
            recall=Rate("all defects", int(rejected[10:].sum()), 12),
            recall_by_kind=[Rate("crack", int(rejected[10:16].sum()), 6), Rate("hole", int(rejected[16:].sum()), 6)],
            image_auroc=auroc(labels, scores),
        )
    shown = []
    if examples:
        for group in ("worst normals", "hardest defects"):
            for i in range(2):
                image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                amap = rng.random((64, 64)).astype(np.float32)
                shown.append(Example(group, f"{group} {i}: 1.00 pass", 1.0, image, amap))
    backbone = BackboneRecord("wide_resnet50_2", ("layer2", "layer3"), 0, "zeros", "float32", "0" * 64)
    manifest = BundleManifest(
        model=model,
        model_params={},
        backbone=backbone,
        preprocessing=Preprocessing((256, 256), (224, 224), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        dataset=DatasetRecord(40, "f" * 64),
        fit={},
        versions={},
        created="2024-05-01T12:00:00 & later",
    )
    return Calibration(
        fit=None,  # type: ignore[arg-type]
        choice=choice,
        manifest=manifest,
        holdout_scores=holdout,
        synthetic_scores=synthetic_scores,
        synthetic_recall=recall,
        synthetic_auroc=separation(holdout, synthetic_scores),
        labelled=check,
        examples=shown,
    )


class Page(HTMLParser):
    """Tags, img sources and the text of a page (entities decoded; block elements and cells apart)."""

    BLOCKS = {"p", "td", "th", "tr", "table", "h1", "h2", "h3", "title", "style", "img", "body"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.images: list[str] = []
        self.chunks: list[str] = []
        self.feed(text)
        self.close()
        self.text = " ".join("".join(self.chunks).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCKS:
            self.chunks.append(" ")
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def pct(v: float) -> str:
    return f"{100 * v:.2f} %" if v < 0.1 else f"{100 * v:.1f} %"


def render(tmp_path: Path, cal: Calibration, bundle: Path = Path("/bundles/m.pt")) -> tuple[list[Path], str]:
    written = write_report(tmp_path, cal, bundle, "0123456789abcdef" * 4)
    return written, (tmp_path / "report.html").read_bytes().decode("utf-8")


def test_hostile_strings_are_text_not_markup(tmp_path: Path) -> None:
    cal = build(model=HOSTILE_MODEL, kind=HOSTILE_KIND)
    _, html = render(tmp_path, cal, HOSTILE_PATH)
    assert "<script" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(" in html and "&amp; co" in html and "&lt;b&gt;stain&lt;/b&gt;" in html
    page = Page(html)
    assert "script" not in page.tags and not any(name.startswith("on") for name, _ in page.attrs)
    assert page.tags.count("img") == len(FIGURES)  # only the template's images
    # ...and a reader sees the strings exactly as they were given.
    assert str(HOSTILE_PATH) in page.text and HOSTILE_MODEL in page.text and HOSTILE_KIND in page.text
    assert "2024-05-01T12:00:00 & later" in page.text


def test_page_states_threshold_bound_and_split(tmp_path: Path) -> None:
    cal = build()
    c = cal.choice
    assert c.meets_target and c.k < c.n  # the bounded case, with an order statistic below the maximum
    _, html = render(tmp_path, cal)
    text = Page(html).text
    assert f"rejected when its anomaly score is above {c.threshold:.4g}" in text
    assert f"rejects at most {pct(c.fpr_bound)} of good parts (target {pct(c.target_fpr)})" in text
    assert f"{40 + c.n} good frames were split at random: 40 to fit the model, {c.n} held out" in text
    assert f"the {c.k}th smallest held-out score" in text
    assert f"chosen (bounded) {c.threshold:.4g} {pct(float((cal.holdout_scores > c.threshold).mean()))}" in text
    assert f"plain 80% quantile {c.empirical_threshold:.4g}" in text
    assert f"is {pct(c.exceed_probability)} (binomial bound; at most {pct(1 - c.confidence)} allowed)" in text
    assert "bundle /bundles/m.pt (hash 0123456789abcdef)" in text.lower() and "wide_resnet50_2" in text
    # synthetic recall per kind and in total, real FPR and recall, AUROC
    total = Rate("all synthetic defects", sum(r.hits for r in cal.synthetic_recall), 12)
    assert f"caught {pct(total.value)} of the time ({total.hits} of 12)" in text
    for r in [*cal.synthetic_recall, total]:
        low, high = r.interval
        assert f"{r.label} {r.hits} / {r.n} {pct(r.value)} {pct(low)} – {pct(high)}" in text
    lab = cal.labelled
    assert lab is not None
    for r in [lab.fpr, lab.recall, *lab.recall_by_kind]:
        assert f"{r.label} {r.hits} / {r.n} {pct(r.value)}" in text
    assert f"Image AUROC on the test set: {lab.image_auroc:.3f}." in text
    assert "Weak bound" not in text
    assert f"against synthetic defects: {cal.synthetic_auroc:.3f}." in text and "Weak model" not in text


def test_a_model_that_separates_defects_poorly_is_named_weak_with_its_figures(tmp_path: Path) -> None:
    cal = build(defect_mean=1.1)  # defects scored like good frames (whose median is about 0.9)
    assert cal.synthetic_auroc is not None and cal.labelled is not None and cal.labelled.image_auroc is not None
    assert cal.synthetic_auroc < 0.9 and cal.labelled.image_auroc < 0.9
    text = Page(render(tmp_path, cal)[1]).text
    weak = (
        f"Weak model. patchcore detects poorly on this data: image AUROC on synthetic defects "
        f"{cal.synthetic_auroc:.3f}, image AUROC on the test set {cal.labelled.image_auroc:.3f} (below 0.90)"
    )
    assert weak in text


def test_separation_is_the_auroc_of_good_against_all_defects() -> None:
    good = np.array([0.1, 0.2, 0.3, 0.4])
    assert separation(good, {"a": np.array([0.5]), "b": np.array([0.6, 0.7])}) == 1.0
    assert separation(good, {"a": np.array([0.25])}) == 0.5  # above two of four good frames
    assert separation(good, {}) is None and separation(np.zeros(0), {"a": good}) is None


def test_weak_bound_and_skipped_parts(tmp_path: Path) -> None:
    cal = build(weak=True, synthetic=False, labelled=False, examples=False)
    c = cal.choice
    assert not c.meets_target
    written, html = render(tmp_path, cal)
    text = Page(html).text
    assert "Weak bound." in text and f"at least {c.min_frames} are needed" in text
    assert f"it rejects at most {pct(c.fpr_bound)} of good parts" in text
    assert f"above {c.threshold:.4g}" in text and "Skipped (calibration.synthetic_per_kind = 0)" in text
    assert "real defects" not in text and "AUROC" not in text and "ROC" not in text and "Examples" not in text
    assert {p.name for p in written} == {FIGURES["histogram"], FIGURES["fpr"], "report.html"}


@pytest.mark.parametrize("full", [True, False])
def test_page_links_exactly_the_pngs_written(tmp_path: Path, full: bool) -> None:
    cal = build() if full else build(synthetic=False, labelled=False, examples=False)
    written, html = render(tmp_path, cal)
    pngs = {p.name for p in written if p.suffix == ".png"}
    on_disk = {p.name for p in tmp_path.glob("*.png")}
    linked = Page(html).images
    assert len(linked) == len(set(linked)) and set(linked) == pngs == on_disk
    assert pngs == (set(FIGURES.values()) if full else {FIGURES["histogram"], FIGURES["fpr"]})
    assert all(p.parent == tmp_path and p.is_file() for p in written)


def _colour_pixels(img_rgb: np.ndarray, rgb: tuple[int, int, int], tol: int = 30) -> int:
    return int((np.abs(img_rgb.astype(int) - np.array(rgb)).max(axis=2) <= tol).sum())


def test_pngs_are_valid_images_with_drawn_series(tmp_path: Path) -> None:
    written, _ = render(tmp_path, build())
    images = {}
    for p in written:
        if p.suffix != ".png":
            continue
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        assert bgr is not None, p
        h, w, channels = bgr.shape
        assert channels == 3 and 300 <= w <= 3000 and 200 <= h <= 3000, (p.name, bgr.shape)
        assert bgr.std() > 5, p.name  # something is drawn on it
        images[p.name] = bgr[:, :, ::-1]
    assert set(images) == set(FIGURES.values())
    for name in (FIGURES["histogram"], FIGURES["fpr"], FIGURES["roc"]):
        img = images[name]
        assert img.shape[:2] == (450, 800)  # the charts' size: 8 x 4.5 in at 100 dpi
        assert (img == 255).all(axis=2).mean() > 0.5  # a chart on white, not an image
        assert _colour_pixels(img, TAB_BLUE) > 200, name  # the first series (the report's text calls it blue)
        assert _colour_pixels(img, TAB_RED) > 200, name  # the second series
    examples = images[FIGURES["examples"]]
    assert examples.shape[1] == 4 * (200 + 6)  # two frames, each with its anomaly map, per row


def test_threshold_at_the_edge_stays_visible() -> None:
    scores = np.linspace(0.0, 1.0, 50)
    ax = histogram_figure("t", {"good": scores}, threshold=1.0).axes[0]
    low, high = ax.get_xlim()
    assert low <= 0.0 and high > 1.0
    ax = curve_figure("c", {"a": (scores, scores)}, "x", "y", vline=(1.0, "t"), limits=(0.0, 1.0, 0.0, 1.0)).axes[0]
    assert ax.get_xlim()[1] > 1.0 and ax.get_ylim() == (0.0, 1.0)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["a", "t"]


def test_degenerate_inputs_still_give_a_figure(tmp_path: Path) -> None:
    # all scores equal and an empty group: the axis must not collapse to zero width
    fig = histogram_figure("t", {"good": np.full(5, 0.3), "none": np.zeros(0)}, threshold=0.3)
    low, high = fig.axes[0].get_xlim()
    assert low < 0.3 < high
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["good (n=5)", "none (n=0)", "threshold 0.3"]
    fig = curve_figure("c", {"a": (np.array([2.0]), np.array([0.1]))}, "x", "y", limits=(2.0, 2.0, 0.0, 0.0))
    low, high = fig.axes[0].get_xlim()
    assert low < 2.0 < high and fig.axes[0].get_ylim()[1] > 0.0


def test_charts_need_no_pyplot() -> None:
    code = (
        "import sys, tempfile, pathlib, numpy as np\n"
        "from calibration.plots import histogram_figure, save_figure\n"
        "p = pathlib.Path(tempfile.mkdtemp()) / 'h.png'\n"
        "save_figure(p, histogram_figure('t', {'a': np.arange(9.0)}, 4.0))\n"
        "assert p.stat().st_size > 1000\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("DISPLAY", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_template_is_package_data() -> None:
    assert files("calibration").joinpath("templates", "report.html.j2").is_file()


def test_series_colours_follow_the_text(tmp_path: Path) -> None:
    # The page says "Blue: share of held-out good frames" and "upper edge (red)": series 1 blue, series 2 red.
    x = np.linspace(0.0, 1.0, 20)
    for n_series in (1, 2):
        series = {"first": (x, x), "second": (x, x**2)}
        fig = curve_figure("c", dict(list(series.items())[:n_series]), "x", "y")
        path = tmp_path / f"c{n_series}.png"
        img = cv2.imread(str(save_figure(path, fig)))[:, :, ::-1]
        assert _colour_pixels(img, TAB_BLUE) > 200
        assert (_colour_pixels(img, TAB_RED) > 200) == (n_series == 2)
