"""Benchmark: linewatch's PatchCore against anomalib's, side by side on the same images, same backbone.

    python bench/anomalib_bench.py [--data ROOT] [--categories grass] [--n-train 100]

Needs anomalib (optional, never a linewatch dependency; e.g. a separate venv with
`pip install -c <(printf 'torch==2.14.1\\ntorchvision==0.29.1\\n') -e '.[demo]' anomalib==2.7.0`).
Without --data it generates MVTec-AD-layout categories from the skimage textures.

Both sides get the same EfficientNet-Lite0 ImageNet weights (anomalib's timm extractor is replaced
by the same network run the way timm would, with Lite0's own normalisation), 256 px frames, the
stride-8 + stride-16 blocks, coreset ratio 0.1, 9 neighbours. anomalib runs its own `Engine.fit` /
`Engine.test` on its own `MVTecAD` datamodule. Printed per category: fit seconds (wall, features +
coreset), batch-1 ms per image (model forward: score + map, after warm-up, p50; linewatch eager, linewatch's
`compile` backend and anomalib timed interleaved, see `batch1_p50_ms`), image AUROC and pixel AUROC, and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from calibration.datasets import MVTecCategory, SkipReport, normal_frames
from calibration.evaluate import metrics_of, score_category
from calibration.fit import fit
from edge.backbones import get_spec, resolve_weights
from edge.backends import prepare_backend
from edge.efficientnet_lite import EfficientNetLite, SameConv2d
from pipeline.app.bench import interleaved_batch1_ms
from pipeline.app.config import load_config, with_overrides

LITE0_LAYERS = ("stride8", "stride16")


class TimmSameConv2d(SameConv2d):
    """SAME padding as timm's `Conv2dSame` does it: a padded copy of the input wherever it is asymmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.same_padding(x)
        return super().forward(x) if before == after else self.conv_padded_copy(x, before, after)


class Lite0Extractor(nn.Module):
    """anomalib's feature-extractor interface ({layer name: map}) over the Lite0 network, as a timm model runs:
    unpadded, BatchNorm as separate layers (linewatch's own loader folds them; anomalib's does not), and
    asymmetric SAME padding as a padded copy (linewatch folds it into the depthwise kernels)."""

    def __init__(self) -> None:
        super().__init__()
        spec = get_spec("efficientnet_lite0")
        self.net = EfficientNetLite()
        self.net.load_state_dict(torch.load(resolve_weights(spec, None), weights_only=True))
        for conv in self.net.modules():
            if isinstance(conv, SameConv2d):
                conv.__class__ = TimmSameConv2d
        self.indices = [spec.feature_points[layer][0] for layer in LITE0_LAYERS]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = self.net.forward_blocks(x, max(self.indices))
        return {layer: blocks[i] for layer, i in zip(LITE0_LAYERS, self.indices, strict=True)}


def run_linewatch(folder: Path) -> tuple[dict[str, float], nn.Module]:
    config = with_overrides(load_config(None), {"model.patchcore.coreset_ratio": 0.1})
    t0 = time.perf_counter()
    result = fit(config, normal_frames(folder))
    fit_s = time.perf_counter() - t0
    e = metrics_of(score_category(result.model, result.preprocessing, MVTecCategory(folder), False, SkipReport()))
    r = {"fit_s": fit_s, "image_auroc": e.image_auroc, "pixel_auroc": e.pixel_auroc}
    return r, result.model.eval()


def run_anomalib(folder: Path, work: Path) -> tuple[dict[str, float], nn.Module]:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    # Lite0 was trained on (x - 127) / 128 of 0..255 pixels; anomalib's images are 0..1.
    lite0_norm = Normalize([127 / 255] * 3, [128 / 255] * 3)
    pre = PreProcessor(transform=Compose([Resize((256, 256), antialias=True), lite0_norm]))
    model = Patchcore(
        backbone="resnet18",  # placeholder, replaced below; pre_trained=False so nothing is downloaded
        layers=LITE0_LAYERS,
        pre_trained=False,
        coreset_sampling_ratio=0.1,
        num_neighbors=9,
        pre_processor=pre,
        visualizer=False,
    )
    model.model.feature_extractor = Lite0Extractor().eval()
    datamodule = MVTecAD(
        root=folder.parent, category=folder.name, train_batch_size=32, eval_batch_size=32, num_workers=0
    )
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=work, enable_progress_bar=False)
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - t0
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    r = {
        "fit_s": fit_s,
        "image_auroc": float(metrics["image_AUROC"]),
        "pixel_auroc": float(metrics.get("pixel_AUROC", float("nan"))),
    }
    return r, model.model.eval()


def batch1_p50_ms(ours: nn.Module, theirs: nn.Module, work: Path) -> dict[str, dict[str, float]]:
    """Batch-1 p50 (score + map) of linewatch eager, linewatch's `compile` backend, and anomalib's model,
    calls interleaved round by round so a noisy box's drift hits all three alike. Timing does not depend
    on pixel values, so all get the same random frame.

    Two ways: "alternating" (one call each per round: every call starts on the caches another model
    left) and "steady" (turns of 5 calls, the first of each left out: each model on warm caches, as on
    a box that runs only it).
    """
    x = torch.randn(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    compiled = prepare_backend(ours, "compile", "cpu", x, work / "engines", "bench")
    models = {"linewatch": ours, "linewatch compile": compiled, "anomalib": theirs}
    return {
        "alternating": interleaved_batch1_ms(models, (256, 256), rounds=100),
        "steady": interleaved_batch1_ms(models, (256, 256), rounds=25, burst=5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of MVTec-layout categories (default: generated)")
    parser.add_argument("--categories", nargs="+", default=["grass"])
    parser.add_argument("--n-train", type=int, default=100)
    args = parser.parse_args()
    try:
        import anomalib
    except ImportError:
        raise SystemExit("anomalib is not installed: this benchmark compares against it (see the docstring)") from None
    work = Path(tempfile.mkdtemp(prefix="linewatch-vs-anomalib-"))
    root = args.data
    if root is None:
        from calibration.synthetic import generate_mvtec_dataset

        root = work / "data"
        generate_mvtec_dataset(root, tuple(args.categories), n_train=args.n_train)
    print(f"anomalib {anomalib.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'category':8s} {'':9s} {'fit s':>7s} {'ms/img':>7s} {'image AUROC':>11s} {'pixel AUROC':>11s}")
    for name in args.categories:
        folder = root / name
        ours, our_model = run_linewatch(folder)
        theirs, their_model = run_anomalib(folder, work / name)
        timings = batch1_p50_ms(our_model, their_model, work / name)
        ms = timings["steady"]
        ours["ms"], theirs["ms"] = ms["linewatch"], ms["anomalib"]
        for label, r in (("linewatch", ours), ("anomalib", theirs)):
            aurocs = f"{r['image_auroc']:11.4f} {r['pixel_auroc']:11.4f}"
            print(f"{name:8s} {label:9s} {r['fit_s']:7.1f} {r['ms']:7.1f} {aurocs}")
        print(f"{name:8s} {'linewatch, backend compile':35s} {ms['linewatch compile']:7.1f}")
        print(f"{'':8s} fit {theirs['fit_s'] / ours['fit_s']:.0f}x faster")
        for way, t in timings.items():
            eager, compiled = t["linewatch"] / t["anomalib"], t["linewatch compile"] / t["anomalib"]
            shares = f"linewatch {eager:.2f}, compile {compiled:.2f}"
            values = " / ".join(f"{t[k]:.1f}" for k in ("linewatch", "linewatch compile", "anomalib"))
            print(f"{'':8s} batch-1 p50, {way:11s}: {values} ms; share of anomalib's time: {shares}")


if __name__ == "__main__":
    main()
