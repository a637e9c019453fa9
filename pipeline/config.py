"""The linewatch configuration: one typed schema, loaded and validated in one place.

Each section is a frozen dataclass; field metadata states the allowed range or choices. Unknown keys,
wrong types and out-of-range values fail at load time with a message naming the key, the value and
what is allowed. Command-line flags are applied with `with_overrides`, which validates the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge.backbones import BACKBONES, BORDER_MODES, resolve_border
from edge.backends import BACKENDS
from edge.models import MODELS
from edge.models.efficientad import PDN_SIZES
from edge.precision import PRECISIONS


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, the key, the value and what is allowed."""


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict[str, Any]:
    return {"min": lo, "max": hi, "min_open": lo_open}


@dataclass(frozen=True)
class PatchCoreConfig:
    coreset_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0, lo_open=True))
    """Fraction of training patches kept in the memory bank (paper: 0.1 or 0.01)."""
    max_bank: int | None = field(default=None, metadata=_range(1))
    """Upper limit on memory-bank rows whatever coreset_ratio gives (bounds memory and search time)."""
    projection_dim: int = field(default=128, metadata=_range(0))
    """Random-projection dimension used only to select the coreset; 0 = no projection."""
    num_neighbors: int = field(default=9, metadata=_range(1))
    """b in the paper's image-score reweighting."""
    search_precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """Nearest-neighbour search: float32 (exact), bfloat16 (one bf16 matmul, maps to ~2.5e-3, the top
    patches of each image searched again in float32 so image scores stay the float32 ones), or auto
    (bfloat16 where the CPU has AMX / AVX512-BF16, else float32). See docs/speed.md."""


@dataclass(frozen=True)
class PadimConfig:
    n_features: int = field(default=100, metadata=_range(1))
    """Random subset of feature channels modelled per position (paper: 100 for ResNet18)."""


@dataclass(frozen=True)
class EfficientADConfig:
    size: str = field(default="small", metadata={"choices": PDN_SIZES})
    """PDN-S (EfficientAD-S) or PDN-M (EfficientAD-M) for teacher and student."""
    teacher: str | None = None
    """Teacher PDN weights (.pth state dict: the authors' pretrained_teacher_small.pth, anomalib's, or one
    saved by linewatch); null = distil one here from model.backbone."""
    distill_images: str | None = None
    """Folder of generic images for distillation and the penalty term; null = the fit images plus
    scikit-image's sample photos when installed."""
    distill_steps: int | None = field(default=None, metadata=_range(0))
    """Teacher distillation steps (batch 4); null = 400 on a CPU, 20000 on CUDA. Ignored with a teacher file."""
    steps: int | None = field(default=None, metadata=_range(1))
    """Student/autoencoder training steps (batch 1); null = 2000 on a CPU, 70000 on CUDA (the paper)."""
    learning_rate: float | None = field(default=None, metadata=_range(0.0, 1.0, lo_open=True))
    """Adam rate of student and autoencoder (divided by 10 for the last 5 % of steps); null = the paper's
    1e-4 (5e-4 with the CPU step count lowered grass AUROC from 0.90 to 0.88)."""
    norm_fraction: float = field(default=0.1, metadata=_range(0.0, 0.5, lo_open=True))
    """Share of the fit frames kept out of training to set the map quantiles (paper: 10 %)."""
    padding: bool = False
    """Pad the PDN convolutions (64 x 64 maps at 256 px); the paper times the unpadded networks."""
    device: str | None = None
    """Where distillation and training run: cpu, cuda, cuda:1, ...; null = fit.device."""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """Training arithmetic: auto = bf16 autocast on CPUs with native bf16 (AMX/AVX512-BF16), else float32."""
    checkpoint: str | None = None
    """Training checkpoint file: resumed when it exists (same settings and data), rewritten every
    checkpoint_every steps; null = no checkpoint."""
    checkpoint_every: int = field(default=200, metadata=_range(1))


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="patchcore", metadata={"choices": tuple(MODELS)})
    backbone: str = field(default="efficientnet_lite0", metadata={"choices": tuple(BACKBONES)})
    """Feature extractor (PatchCore, PaDiM) or the network EfficientAD's teacher is distilled from."""
    backbone_weights: str | None = None
    """Path to the backbone's .pth; default: the weights package (Lite0) or the torch hub cache."""
    layers: tuple[str, ...] | None = field(default=None, metadata={"nonempty": True})
    """Feature layers; default stride 8 and 16 of the backbone."""
    input_size: int = field(default=256, metadata=_range(32, 2048))
    crop_size: int | None = field(default=None, metadata=_range(32, 2048))
    border_mode: str | None = field(default=None, metadata={"choices": BORDER_MODES})
    """What surrounds the frame: zeros (the CNN's own padding; PatchCore's pooling counts them too), or
    `border_pad` pixels filled by circular (wrapping the opposite edge), reflect or replicate. null: the
    model's own, PatchCore zeros and PaDiM circular (docs/speed.md, "Frame border")."""
    border_pad: int | None = field(default=None, metadata=_range(0, 256))
    """Pixels added around the frame before the backbone (multiple of its largest stride). null: none
    for zeros, 16 for the other modes."""
    backbone_precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """Arithmetic of the backbone (PatchCore, PaDiM): float32, bfloat16, or auto (bfloat16 on CPUs with
    AMX / AVX512-BF16, float32 elsewhere and on GPUs). Fit, calibration and scoring use the same one, so
    calibrate on the kind of box the line runs on. See docs/speed.md."""
    sigma: float = field(default=4.0, metadata=_range(0.0, 64.0))
    """Gaussian smoothing of the anomaly map, in input pixels; 0 = none."""
    patchcore: PatchCoreConfig = PatchCoreConfig()
    padim: PadimConfig = PadimConfig()
    efficientad: EfficientADConfig = EfficientADConfig()

    def border(self) -> tuple[str, int]:
        """(border_mode, border_pad), with what this config leaves open filled in for its model."""
        return resolve_border(self.name, self.border_mode, self.border_pad)


@dataclass(frozen=True)
class FitConfig:
    batch_size: int = field(default=4, metadata=_range(1, 1024))
    """Frames per feature-extraction batch in fit and calibrate. 4 on CPUs: on the 2-core dev box batch 16
    took twice as long per frame (activations fall out of cache); raise it on a GPU."""
    seed: int = field(default=0, metadata=_range(0))
    threads: int = field(default=0, metadata=_range(0, 1024))
    """torch CPU threads; 0 = torch's default (one per core)."""
    device: str = "cpu"
    """Where fit and calibrate run (features, coreset, EfficientAD training, threshold scoring): cpu, cuda,
    cuda:1, ... The threshold is chosen on scores computed here: calibrate on the device the line runs on."""


@dataclass(frozen=True)
class CalibrationConfig:
    target_fpr: float = field(default=0.01, metadata=_range(0.0, 0.5, lo_open=True))
    """False-reject rate the threshold must stay under (fraction of good parts rejected)."""
    confidence: float = field(default=0.95, metadata=_range(0.5, 0.9999))
    """Probability that the true false-reject rate is at or under target_fpr."""
    holdout_fraction: float = field(default=0.5, metadata=_range(0.0, 0.95, lo_open=True))
    """Share of the normal frames held out from fitting to choose the threshold."""
    seed: int = field(default=0, metadata=_range(0))
    """Seed of the fit/held-out split and of the synthetic defects."""
    synthetic_per_kind: int = field(default=40, metadata=_range(0, 100000))
    """Held-out frames given each synthetic defect kind for the recall estimate; 0 = skip."""
    allow_weak_bound: bool = False
    """Use the largest held-out score when there are too few frames for the bound (and say so)."""


SOURCE_KINDS = ("folder", "video", "camera")


@dataclass(frozen=True)
class SourceConfig:
    spec: str
    """folder:PATH (recursive, sorted; an MVTec category replays test/ with labels), video:PATH,
    camera:INDEX_OR_URL."""
    id: str | None = None
    """camera_id in rejects and metrics; default cam0, cam1, ... in list order."""
    rate_ppm: float = field(default=0.0, metadata=_range(0.0, 1e6))
    """Replay pace in parts per minute (folder/video); 0 = as fast as the pipeline takes them."""
    loop: bool = False
    """Replay the folder/video again when it ends."""
    policy: str | None = field(default=None, metadata={"choices": ("block", "drop_oldest")})
    """block: every frame is processed (the source waits); drop_oldest: stay current, count drops.
    Default: block for folder/video, drop_oldest for camera."""
    reconnect_max_s: float = field(default=5.0, metadata=_range(0.1, 600.0))
    """Longest wait between reconnect attempts of a lost camera (backoff doubles up to this)."""


@dataclass(frozen=True)
class PipelineConfig:
    bundle: str | None = None
    """Calibrated bundle to run (linewatch calibrate); --bundle overrides."""
    sources: tuple[SourceConfig, ...] = ()
    ring_slots: int = field(default=8, metadata=_range(2, 1024))
    """Frames buffered per camera between capture and preprocessing."""
    tensor_slots: int = field(default=16, metadata=_range(2, 4096))
    """Preprocessed frames buffered before inference (>= max_batch)."""
    max_frame_height: int = field(default=1080, metadata=_range(16, 16384))
    max_frame_width: int = field(default=1920, metadata=_range(16, 16384))
    """Frames larger than this are downscaled at capture (they are resized for the model anyway)."""
    max_batch: int = field(default=2, metadata=_range(1, 1024))
    """Largest inference batch (across cameras). 2 on CPUs: on the 2-core dev box batch 2 ran 122 frames/s
    against 97 at batch 1, and batch 4 was slower (activations fall out of cache); raise it on a GPU."""
    max_wait_ms: float = field(default=0.0, metadata=_range(0.0, 1000.0))
    """How long inference waits for a fuller batch once a frame is ready. 0: take what is there; under
    load frames queue during each inference and batches fill by themselves, while a lone frame never
    waits (2 ms here made frames queue into batches of 4 at 80 % load and tripled the p99)."""
    device: str = "cpu"
    """torch device for inference: cpu, cuda, cuda:1, ..."""
    backend: str = field(default="torch", metadata={"choices": BACKENDS})
    """torch (eager), compile (torch.compile, ~40 s at start), tensorrt (FP16 engine, CUDA only)."""
    backend_fallback: bool = False
    """When the backend cannot run here, log why and run eager torch instead of refusing to start."""
    engine_cache: str | None = None
    """Folder for compiled TensorRT engines; default: an `engines` folder next to the bundle."""
    heartbeat_timeout_s: float = field(default=30.0, metadata=_range(1.0, 3600.0))
    """A stage silent for this long is restarted like a crashed one."""
    decide_priority: int = field(default=10, metadata=_range(0, 99))
    """SCHED_FIFO priority of the decide stage, which thresholds and publishes (0: normal scheduling). A
    verdict then goes out as soon as its score exists; at normal priority it could wait 2-10 ms behind the
    next part's inference. Needs CAP_SYS_NICE or an rtprio limit; without either the stage logs it and runs
    at normal priority."""


@dataclass(frozen=True)
class PublisherConfig:
    address: str = "tcp://127.0.0.1:5556"
    """ZeroMQ PUB endpoint the PLC bridge subscribes to."""
    send_hwm: int = field(default=10000, metadata=_range(1))
    """Messages queued per slow subscriber before ZeroMQ drops for it (the line never waits)."""


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9108, metadata=_range(0, 65535))
    """Prometheus /metrics port; 0 = any free port."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    fit: FitConfig = FitConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    pipeline: PipelineConfig = PipelineConfig()
    publisher: PublisherConfig = PublisherConfig()
    metrics: MetricsConfig = MetricsConfig()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp`, returning it converted (lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} = {value!r}: expected null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r}: expected a {_type_name(tp)}")
        return tuple(_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return _build(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")


def _check_field(f: dataclasses.Field, value: Any, key: str, raw: Any) -> None:
    """Choices and range of a converted `value`; messages quote the `raw` value as written."""
    meta = f.metadata
    if value is None:
        return
    if meta.get("nonempty") and value == ():
        raise ConfigError(f"{key} = {raw!r}: expected a non-empty list")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} = {raw!r}: expected one of {', '.join(map(str, choices))}")
    lo, hi, lo_open = meta.get("min"), meta.get("max"), meta.get("min_open")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and value > hi
    if below or above:
        allowed = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
        allowed += [f"<= {hi}"] if hi is not None else []
        raise ConfigError(f"{key} = {raw!r}: out of range, expected a value {' and '.join(allowed)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key, expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(data[name], hints[name], key)
            _check_field(f, value, key, data[name])
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    return _build(Config, data or {}, "")


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config; None gives the defaults. Errors are prefixed with the file name."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-serialisable) dict of a config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (e.g. {"model.name": "padim"}) from the command line; None = not given."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"command line: {exc}") from None
