"""Inference backends: how a fitted model runs on the box.

- `torch`: eager PyTorch on the CPU or a CUDA device.
- `compile`: `torch.compile` (Inductor) of the whole scoring module; about 1.6x faster than eager on
  the 2-core dev CPU at batch 1, after a one-off compile of roughly 40 s at start-up. On CUDA each call
  is replayed as one CUDA graph (outputs live until the next call: the infer stage copies them out first).
- `tensorrt`: torch-tensorrt (dynamo) compile of the `torch.export` graph of the whole module
  (backbone + scoring) in FP16 with static shapes. The engine is cached on disk under a key made of
  the bundle hash, the GPU, the TensorRT and torch versions, the batch and the input shape, and is
  loaded on the next start without recompiling. Batches smaller than the engine's are padded.

When a backend cannot run here (no CUDA, torch-tensorrt missing, compile failure) `prepare_backend`
raises `BackendError` with the reason, or, when fallback is allowed, logs the reason and runs eager.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge.scoring import Scorer, ScoreResult

BACKENDS = ("torch", "compile", "tensorrt")

# torch-tensorrt 2.14 keywords (its `compile` swallows unknown ones silently: the older
# `enabled_precisions={torch.float16}` would build an FP32 engine). FP16 by autocast; layers whose
# outputs exceed the autocast threshold (512, e.g. the squared norms of the nearest-neighbour search)
# stay FP32; matmuls accumulate in FP32 so a 152-term distance does not lose its low bits.
TENSORRT_SETTINGS: dict[str, object] = {
    "enable_autocast": True,
    "autocast_low_precision_type": torch.float16,
    "use_fp32_acc": True,
}
log = logging.getLogger("linewatch.backends")


class BackendError(RuntimeError):
    """The requested backend cannot run on this box; the message says why and what to do."""


@dataclass
class PreparedModel:
    """A callable model for `backend`; `static_batch` is set when inputs must have exactly that batch."""

    run: Callable[[torch.Tensor], ScoreResult]
    backend: str
    static_batch: int | None = None

    def __call__(self, x: torch.Tensor) -> ScoreResult:
        n = x.shape[0]
        if self.static_batch is None or n == self.static_batch:
            return self.run(x)
        if n > self.static_batch:
            raise ValueError(f"batch {n} is larger than the engine's static batch {self.static_batch}")
        pad = x[-1:].expand(self.static_batch - n, *x.shape[1:])  # repeat the last frame; outputs dropped
        out = self.run(torch.cat([x, pad]))
        return ScoreResult(out.scores[:n], out.maps[:n])

    def warm_up(self, example: torch.Tensor, rounds: int = 2) -> None:
        """Run every batch size up to `example`'s, so the first parts on the line do not pay for kernel
        selection and allocation: on the dev CPU the first batch-1 call after batch 2 took 46 ms, the
        next ones 24 ms."""
        with torch.inference_mode():
            for _ in range(rounds):
                for n in range(1, example.shape[0] + 1):
                    self(example[:n])


class OnDevice:
    """`model` (already on `device`) called with CPU frames, returning CPU float32 results: offline scoring
    (calibrate, benchmarks) on a GPU box. With `autocast`, it runs under that low-precision type."""

    def __init__(self, model: Scorer, device: str, autocast: torch.dtype | None = None) -> None:
        self.model, self.device, self.autocast = model, device, autocast

    def __call__(self, x: torch.Tensor) -> ScoreResult:
        kind = torch.device(self.device).type
        with torch.autocast(kind, dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext():
            out = self.model(x.to(self.device, non_blocking=True))
        return ScoreResult(out.scores.float().cpu(), out.maps.float().cpu())


def engine_cache_dir(configured: str | None, bundle_path: Path) -> Path:
    """`pipeline.engine_cache`, or an `engines` folder next to the bundle when not configured."""
    return Path(configured) if configured else Path(bundle_path).parent / "engines"


def engine_key(bundle_hash: str, device_name: str, trt_version: str, batch: int, shape: tuple[int, ...]) -> str:
    """Cache key of a TensorRT engine: anything that changes the engine changes the key."""
    text = "|".join([bundle_hash, device_name, trt_version, torch.__version__, str(batch), "x".join(map(str, shape))])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def prepare_backend(
    model: nn.Module,
    backend: str,
    device: str,
    example: torch.Tensor,
    cache_dir: Path,
    bundle_hash: str,
    allow_fallback: bool = False,
) -> PreparedModel:
    """Put `model` on `device` and wrap it for `backend`; `example` has the pipeline's batch and shape."""
    if backend not in BACKENDS:
        raise BackendError(f"pipeline.backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
    model = model.eval().to(device)
    example = example.to(device)
    try:
        if backend == "compile":
            return _compiled(model, example)
        if backend == "tensorrt":
            return _tensorrt(model, device, example, cache_dir, bundle_hash)
    except BackendError as exc:
        if not allow_fallback:
            raise
        log.warning("%s; falling back to eager torch on %s (pipeline.backend_fallback is true)", exc, device)
    return PreparedModel(model, "torch")


def compile_options(device_type: str) -> dict[str, object]:
    """Inductor options of the `compile` backend on a `device_type` ("cpu", "cuda") device."""
    # Inductor by default drops a float32 -> bf16 -> float32 round trip inside a fused kernel; the bf16 search
    # (`edge.scoring.bfloat16_bank_operand`) needs that rounding to be real, or its norms' low halves are zero.
    options: dict[str, object] = {"emulate_precision_casts": True}
    if device_type == "cuda":
        # At batch 1 the GPU waits on kernel launches: replayed as one CUDA graph, the whole model is one launch.
        options["triton.cudagraphs"] = True
    return options


def _compiled(model: nn.Module, example: torch.Tensor) -> PreparedModel:
    compiled = torch.compile(model, dynamic=False, options=compile_options(example.device.type))
    try:
        with torch.inference_mode():
            compiled(example)  # compile now, at start-up, not on the first frame of the line
    except Exception as exc:  # Inductor raises many types (missing compiler, unsupported op, ...)
        raise BackendError(f"pipeline.backend = compile: torch.compile failed: {str(exc).splitlines()[0]}") from exc
    # Static batch: a partial batch is padded instead of triggering a new compile for its shape.
    return PreparedModel(compiled, "compile", static_batch=int(example.shape[0]))


def require_device(key: str, device: str) -> torch.device:
    """The torch device that config field `key` names, or ValueError saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{key} = {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} = {device}: no CUDA device is available on this machine")
    return dev


def check_backend(backend: str, device: str, allow_fallback: bool = False) -> None:
    """Raise BackendError now when `backend` cannot run on `device` here (before any process starts or any
    model is loaded). With `allow_fallback` a backend that cannot run is let through, since eager torch will
    run instead, but a device that is not there is still refused: the fallback runs on the same device."""
    if backend not in BACKENDS:
        raise BackendError(f"pipeline.backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
    try:
        require_device("pipeline.device", device)
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    if backend == "tensorrt" and not allow_fallback:
        _import_tensorrt(device)


def _import_tensorrt(device: str) -> types.ModuleType:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise BackendError(
            f"pipeline.backend = tensorrt needs a CUDA device (pipeline.device = {device}, "
            f"CUDA available: {torch.cuda.is_available()})"
        )
    try:
        import torch_tensorrt  # optional extra
    except ImportError as exc:
        raise BackendError(
            "pipeline.backend = tensorrt: torch-tensorrt is not installed (pip install 'linewatch[tensorrt]')"
        ) from exc
    return torch_tensorrt


class TupleOutputs(nn.Module):
    """`model` returning (scores, maps) as a plain tuple: a saved ExportedProgram can only hold output
    containers that torch knows by a serialized name, and `ScoreResult` is not one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out.scores, out.maps


def _tensorrt(model: nn.Module, device: str, example: torch.Tensor, cache_dir: Path, bundle_hash: str) -> PreparedModel:
    torch_tensorrt = _import_tensorrt(device)
    name = torch.cuda.get_device_name(torch.device(device))
    key = engine_key(bundle_hash, name, str(torch_tensorrt.__version__), example.shape[0], tuple(example.shape[1:]))
    path = Path(cache_dir) / f"{key}.ep"
    if path.is_file():
        log.info("loading cached TensorRT engine %s", path)
        module = torch.export.load(str(path)).module()
    else:
        log.info("compiling TensorRT engine (FP16, batch %d); cached as %s", example.shape[0], path)
        exported = torch.export.export(TupleOutputs(model), (example,))
        try:
            module = torch_tensorrt.dynamo.compile(exported, arg_inputs=[example], **TENSORRT_SETTINGS)
        except Exception as exc:
            raise BackendError(f"pipeline.backend = tensorrt: compile failed: {str(exc).splitlines()[0]}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch_tensorrt.save(module, str(tmp), arg_inputs=[example])
        tmp.replace(path)

    def run(x: torch.Tensor) -> ScoreResult:
        return ScoreResult(*module(x))

    return PreparedModel(run, "tensorrt", static_batch=int(example.shape[0]))
