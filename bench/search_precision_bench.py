"""Benchmark: PatchCore's float32 search against the bf16 search, same bank, same images, same run.

    python bench/search_precision_bench.py [--data ROOT] [--categories grass brick gravel] [--n-train 100]

For each MVTec-layout category (generated from the skimage textures when --data is not given) it fits
PatchCore once, builds the float32 and the bfloat16 model on that one memory bank, and prints image
AUROC, pixel AUROC and PRO of both, the largest image-score and map differences, and the batch-1
latency of both (interleaved, so drift on a noisy machine hits both alike).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from calibration.datasets import MVTecCategory, SkipReport, normal_frames
from calibration.evaluate import metrics_of, score_category
from calibration.fit import preprocess_samples
from edge.backbones import get_spec, load_backbone
from edge.models.patchcore import PatchCoreModel
from pipeline.app.bench import interleaved_batch1_ms
from pipeline.app.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of MVTec-layout categories (default: generated)")
    parser.add_argument("--categories", nargs="+", default=["grass", "brick", "gravel"])
    parser.add_argument("--n-train", type=int, default=100)
    args = parser.parse_args()
    from calibration.fit import fit_patchcore

    root = args.data
    if root is None:
        from calibration.synthetic import generate_mvtec_dataset

        root = Path(tempfile.mkdtemp(prefix="linewatch-precision-"))
        generate_mvtec_dataset(root, tuple(args.categories), n_train=args.n_train)
    mc = load_config(None).model
    spec = get_spec(mc.backbone)
    pre = spec.preprocessing(mc.input_size)
    border_mode, border_pad = mc.border()
    backbone = load_backbone(mc.backbone, None, None, border_pad, border_mode).module
    print(f"{'category':8s} {'search':9s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'PRO':>7s} {'batch-1 p50':>11s}")
    for name in args.categories:
        folder = root / name
        images = preprocess_samples(normal_frames(folder), pre, False, SkipReport())
        fitted = fit_patchcore(backbone, images, mc.patchcore.coreset_ratio, search_precision="float32")
        models = {
            p: PatchCoreModel(backbone, fitted.memory_bank, pre.input_size, search_precision=p).eval()
            for p in ("float32", "bfloat16")
        }
        scored = {p: score_category(m, pre, MVTecCategory(folder), False, SkipReport()) for p, m in models.items()}
        ms = interleaved_batch1_ms(models, pre.input_size)
        for p, s in scored.items():
            e = metrics_of(s)
            print(f"{name:8s} {p:9s} {e.image_auroc:11.4f} {e.pixel_auroc:11.5f} {e.pro:7.4f} {ms[p]:9.1f} ms")
        a, b = scored["float32"], scored["bfloat16"]
        score_rel = np.abs(a.scores - b.scores) / np.abs(a.scores)
        map_rel = np.abs(a.maps - b.maps) / np.abs(a.maps).max(axis=(1, 2), keepdims=True)
        print(
            f"{'':8s} image scores: max relative difference {score_rel.max():.1e}; maps: max difference "
            f"{map_rel.max():.1e} of the map's maximum; bf16 / float32 latency {ms['bfloat16'] / ms['float32']:.2f}"
        )


if __name__ == "__main__":
    main()
