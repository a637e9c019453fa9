"""Coverage experiment: does the calibrated threshold keep its false-reject promise on unseen frames?

For each of --splits random splits of one pool of normal frames into fit / calibration / test sets:
fit PatchCore on the fit set, choose the threshold on the calibration set (`choose_threshold`), and
measure the realised false-reject rate on the test set. The bound promises that the realised rate
exceeds the target in at most (1 - confidence) of splits; the plain empirical quantile is measured
alongside as the baseline. Backbone features are computed once for the whole pool (the backbone is
fixed), so each split costs a coreset and a nearest-neighbour search, not a forward pass per frame.

    python bench/coverage_bench.py                  # 200 splits, two settings, ~10 min on 2 cores
    python bench/coverage_bench.py --splits 20      # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from calibration.coreset import k_center_greedy
from calibration.synthetic import normal_tile, texture_photo
from calibration.threshold import choose_threshold
from edge.backbones import get_spec, load_backbone
from edge.models.patchcore import PatchCoreModel, patchcore_embedding
from edge.preprocessing import to_rgb8

# (target FPR, confidence, calibration frames): the 299-frame minimum (k = n), and k < n.
SETTINGS = ((0.01, 0.95, 299), (0.05, 0.90, 150))


def pool_embeddings(texture: str, n: int, size: int, seed: int) -> tuple[PatchCoreModel, torch.Tensor]:
    """Patch features (n, C, h, w) of n generated normal frames, plus a model shell for scoring."""
    photo = texture_photo(texture)
    rng = np.random.default_rng(seed)
    backbone = load_backbone("efficientnet_lite0").module
    pre = get_spec("efficientnet_lite0").preprocessing(size, None)
    frames = np.stack([pre(to_rgb8(normal_tile(photo, size, rng))) for _ in range(n)])
    chunks = []
    with torch.inference_mode():
        for start in range(0, n, 32):
            chunks.append(patchcore_embedding(backbone, torch.from_numpy(frames[start : start + 32])))
    emb = torch.cat(chunks)
    shell = PatchCoreModel(backbone, torch.zeros(1, emb.shape[1]), (size, size))
    return shell, emb


def run_split(
    shell: PatchCoreModel, emb: torch.Tensor, fit_idx: np.ndarray, rest_idx: np.ndarray, seed: int
) -> np.ndarray:
    """Fit a memory bank on fit_idx (coreset 10 %) and return the scores of rest_idx."""
    c = emb.shape[1]
    feats = emb[torch.from_numpy(fit_idx)].permute(0, 2, 3, 1).reshape(-1, c)
    bank = feats[k_center_greedy(feats, max(1, feats.shape[0] // 10), 128, seed)]
    model = PatchCoreModel(shell.backbone, bank, shell.smoother.output_size, num_neighbors=9, sigma=0.0)
    scores = []
    with torch.inference_mode():
        for start in range(0, rest_idx.size, 64):
            batch = emb[torch.from_numpy(rest_idx[start : start + 64])]
            scores.append(model.score_embedding(batch).scores)
    return torch.cat(scores).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--pool", type=int, default=1600, help="normal frames generated")
    parser.add_argument("--fit", type=int, default=30, help="frames per fit set")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--texture", default="grass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    shell, emb = pool_embeddings(args.texture, args.pool, args.size, args.seed)
    print(f"pool: {args.pool} {args.texture} frames at {args.size}px, features in {time.perf_counter() - t0:.0f}s")
    rng = np.random.default_rng([args.seed, 1])
    results = {}
    for target, conf, n_cal in SETTINGS:
        bounded, plain = [], []
        t1 = time.perf_counter()
        for split in range(args.splits):
            order = rng.permutation(args.pool)
            fit_idx, rest = order[: args.fit], order[args.fit :]
            scores = run_split(shell, emb, fit_idx, rest, seed=split)
            cal, test = scores[:n_cal], scores[n_cal:]
            choice = choose_threshold(cal, target, conf)
            bounded.append(float((test > choice.threshold).mean()))
            plain.append(float((test > choice.empirical_threshold).mean()))
        n_test = args.pool - args.fit - n_cal
        b, p = np.asarray(bounded), np.asarray(plain)
        allowed = 1.0 - conf
        se = math.sqrt(allowed * conf / args.splits)
        results[f"fpr{target}_conf{conf}"] = {
            "target_fpr": target,
            "confidence": conf,
            "n_calibration": n_cal,
            "n_test": n_test,
            "splits": args.splits,
            "bounded_exceed_share": float((b > target).mean()),
            "bounded_mean_fpr": float(b.mean()),
            "plain_exceed_share": float((p > target).mean()),
            "plain_mean_fpr": float(p.mean()),
            "allowed_share": allowed,
            "sampling_se": se,
        }
        print(
            f"target {target:.0%} @ {conf:.0%} (n_cal={n_cal}, n_test={n_test}, {args.splits} splits, "
            f"{time.perf_counter() - t1:.0f}s):\n"
            f"  bounded threshold: realised FPR > target in {(b > target).mean():.1%} of splits "
            f"(allowed {allowed:.0%} +- {2 * se:.1%} at 2 se), mean realised FPR {b.mean():.2%}\n"
            f"  plain quantile   : realised FPR > target in {(p > target).mean():.1%} of splits, "
            f"mean realised FPR {p.mean():.2%}"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
