"""Benchmark: batched normalisation (uint8 NHWC -> float32 NCHW channels-last) as the infer stage runs it,
against a plain per-channel broadcast, timed interleaved at the pipeline's batch sizes; values compared bit for bit.

    python bench/normalise_bench.py [--rounds 400] [--size 256]
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch

from edge.backbones import get_spec
from edge.preprocessing import Preprocessing
from pipeline.app.bench import interleaved_call_seconds


def broadcast_per_channel(pre: Preprocessing, rgb8: torch.Tensor) -> torch.Tensor:
    """The plain form: constants of shape (1, 3, 1, 1), so the innermost loop runs over 3 channels."""
    x = rgb8.to(torch.float32).permute(0, 3, 1, 2)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    pre = get_spec("efficientnet_lite0").preprocessing(args.size)
    rng = np.random.default_rng(0)
    for batch in (1, 2, 8):
        rgb8 = torch.from_numpy(rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8))
        assert torch.equal(pre.normalize_batch(rgb8), broadcast_per_channel(pre, rgb8))
        spent = interleaved_call_seconds(
            {
                "row": functools.partial(pre.normalize_batch, rgb8),
                "broadcast": functools.partial(broadcast_per_channel, pre, rgb8),
            },
            rounds=args.rounds,
        )
        row, old = (float(np.median(spent[k])) * 1000.0 for k in ("row", "broadcast"))
        print(f"batch {batch}: normalize_batch {row:.3f} ms, per-channel broadcast {old:.3f} ms -> {old / row:.1f}x")


if __name__ == "__main__":
    main()
