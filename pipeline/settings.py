"""Settings of the streaming runtime: pipeline, sources, publisher, metrics, store and the operator page.

The application shell fills these from `config.yaml` and passes them to `Pipeline`; nothing here
reads a file. Field metadata states what each value may be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.backends import BACKENDS
from edge.settings import bounded, one_of

SOURCE_KINDS = ("folder", "video", "camera")


@dataclass(frozen=True)
class SourceConfig:
    spec: str
    """folder:PATH (recursive, sorted; an MVTec category replays test/ with labels), video:PATH,
    camera:INDEX_OR_URL."""
    id: str | None = None
    """camera_id in rejects and metrics; default cam0, cam1, ... in list order."""
    rate_ppm: float = field(default=0.0, metadata=bounded(0.0, 1e6))
    """Replay pace in parts per minute (folder/video); 0 = as fast as the pipeline takes them."""
    loop: bool = False
    """Replay the folder/video again when it ends."""
    policy: str | None = field(default=None, metadata=one_of(("block", "drop_oldest")))
    """block: every frame is processed (the source waits); drop_oldest: stay current, count drops.
    Default: block for folder/video, drop_oldest for camera."""
    reconnect_max_s: float = field(default=5.0, metadata=bounded(0.1, 600.0))
    """Longest wait between reconnect attempts of a lost camera (backoff doubles up to this)."""
    bundle: str | None = None
    """The bundle that decides this camera's frames (a view of its own: top, side, label); default
    `pipeline.bundle`. Every bundle of a run takes the same input size."""
    shadow_bundle: str | None = None
    """A candidate bundle that scores this camera's frames beside the live one: its verdicts are stored (and where
    they disagree, the frames kept), never published. It must resize and crop as the live bundle does."""


@dataclass(frozen=True)
class PipelineConfig:
    bundle: str | None = None
    """Calibrated bundle to run (linewatch calibrate) for every source that names none; --bundle overrides."""
    sources: tuple[SourceConfig, ...] = ()
    recipes: dict[str, str] = field(default_factory=dict)
    """Named bundles (product name: bundle file) that `linewatch switch --recipe NAME`, a PLC bridge or the operator
    page can put a camera on while the run goes on."""
    bundle_library: str | None = None
    """Folder of bundles named by their content hash (`linewatch library add`). Where a bundle is named as
    `sha256:HASH` (pipeline.bundle, sources[].bundle and shadow_bundle, recipes, `linewatch switch --bundle`),
    it is HASH.pt there, and linewatch refuses to start unless that file's content hash is HASH."""
    control_address: str | None = "tcp://127.0.0.1:5559"
    """ZeroMQ endpoint taking changeover requests (`linewatch switch`); null: no changeover at run time."""
    ring_slots: int = field(default=8, metadata=bounded(2, 1024))
    """Frames buffered per camera between capture and preprocessing."""
    tensor_slots: int = field(default=16, metadata=bounded(2, 4096))
    """Preprocessed frames buffered before inference (>= max_batch)."""
    max_frame_height: int = field(default=1080, metadata=bounded(16, 16384))
    max_frame_width: int = field(default=1920, metadata=bounded(16, 16384))
    """Frames larger than this are downscaled at capture (they are resized for the model anyway)."""
    max_batch: int = field(default=2, metadata=bounded(1, 1024))
    """Largest inference batch (across cameras). 2 on CPUs: on the 2-core dev box batch 2 ran 122 frames/s
    against 97 at batch 1, and batch 4 was slower (activations fall out of cache); raise it on a GPU."""
    max_wait_ms: float = field(default=0.0, metadata=bounded(0.0, 1000.0))
    """How long inference waits for a fuller batch once a frame is ready. 0: take what is there; under
    load frames queue during each inference and batches fill by themselves, while a lone frame never
    waits (2 ms here made frames queue into batches of 4 at 80 % load and tripled the p99)."""
    device: str = "cpu"
    """torch device for inference: cpu, cuda, cuda:1, ..."""
    backend: str = field(default="torch", metadata=one_of(BACKENDS))
    """torch (eager), compile (torch.compile, ~40 s at start), tensorrt (FP16 engine, CUDA only)."""
    backend_fallback: bool = False
    """When the backend cannot run here, log why and run eager torch instead of refusing to start."""
    engine_cache: str | None = None
    """Folder for compiled TensorRT engines; default: an `engines` folder next to the bundle."""
    heartbeat_timeout_s: float = field(default=2.0, metadata=bounded(0.2, 3600.0))
    """A stage on the verdict path (preprocess, infer, decide) silent for this long is restarted like a crashed
    one. They beat every 50 ms; at 80 parts/s, 2 s is 160 uninspected parts before the restart begins."""
    background_heartbeat_timeout_s: float = field(default=60.0, metadata=bounded(1.0, 3600.0))
    """The same for the recorder and the operator page, off the verdict path: a slow database write or a
    long page request must not cost them a restart."""
    max_restarts: int = field(default=5, metadata=bounded(1, 1000))
    """Restarts of one stage within `restart_window_s` after which the run stops with a non-zero exit, so that
    systemd / Kubernetes restart the whole box process and alert."""
    restart_window_s: float = field(default=600.0, metadata=bounded(1.0, 86400.0))
    restart_backoff_s: float = field(default=1.0, metadata=bounded(0.0, 600.0))
    """Wait before a stage's second restart within the window; doubled for each further one. The first
    restart is immediate: a single crash should cost as few parts as possible."""
    restart_backoff_max_s: float = field(default=30.0, metadata=bounded(0.0, 3600.0))
    decide_priority: int = field(default=10, metadata=bounded(0, 99))
    """SCHED_FIFO priority of the decide stage, which thresholds and publishes (0: normal scheduling). A
    verdict then goes out as soon as its score exists; at normal priority it could wait 2-10 ms behind the
    next part's inference. Needs CAP_SYS_NICE or an rtprio limit; without either the stage logs it and runs
    at normal priority."""


@dataclass(frozen=True)
class PublisherConfig:
    address: str = "tcp://127.0.0.1:5556"
    """ZeroMQ PUB endpoint the PLC bridge subscribes to."""
    send_hwm: int = field(default=10000, metadata=bounded(1))
    """Messages queued per slow subscriber before ZeroMQ drops for it (the line never waits)."""
    replay_address: str = "tcp://127.0.0.1:5557"
    """ZeroMQ request endpoint that sends missed verdicts again from the store (needs store.enabled)."""
    heartbeat_ms: float = field(default=200.0, metadata=bounded(10.0, 60000.0))
    """A `heartbeat` message (last seq, health) goes out this often, so silence never reads as "all good"."""


@dataclass(frozen=True)
class StoreConfig:
    enabled: bool = True
    """Record every verdict (and the images of rejects and sampled passes)."""
    path: str | None = None
    """Data folder: the SQLite store, the image archive and the spool. Default: `linewatch-data` next to
    the bundle."""
    url: str | None = None
    """Database URL, e.g. postgresql+psycopg://user:password@host/linewatch; default: SQLite in `path`."""
    line: str = ""
    """This line's id, written into every stored row. One PostgreSQL can then hold a plant's lines: each box
    writes its line's rows and reads, replays and shows only those."""
    keep_pass_fraction: float = field(default=0.01, metadata=bounded(0.0, 1.0))
    """Share of passed parts whose frame and overlay are archived (every reject's are)."""
    max_gb: float = field(default=20.0, metadata=bounded(0.001, 1e6))
    """Image archive size; beyond it the oldest images are deleted (their rows stay, marked expired)."""
    max_days: float = field(default=90.0, metadata=bounded(0.001, 36500.0))
    """Images older than this are deleted (their rows stay, marked expired)."""
    buffer_slots: int = field(default=4096, metadata=bounded(16, 1_000_000))
    """Verdicts buffered in memory for the recorder; when full, the decide stage spools to disk instead."""
    image_slots: int = field(default=32, metadata=bounded(2, 4096))
    """Kept frames (with their anomaly maps) buffered in memory for the archive; when full, spooled."""
    spool_max_gb: float = field(default=5.0, metadata=bounded(0.001, 1e6))
    """Most disk the spool may take while the store is unreachable; past it, verdicts are counted as lost."""


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9108, metadata=bounded(0, 65535))
    """Port of /metrics (Prometheus), /healthz and /readyz; 0 = any free port."""
    stall_s: float = field(default=10.0, metadata=bounded(0.5, 3600.0))
    """/healthz fails, and `linewatch_up` reads 0, when the supervisor loop has not passed for this long."""


@dataclass(frozen=True)
class UiConfig:
    enabled: bool = True
    """Serve the operator page (live view, history, review) while `linewatch run` runs; needs store.enabled."""
    host: str = "127.0.0.1"
    """Address the page listens on. On 127.0.0.1 (or ::1, localhost) anyone on the box may look without
    logging in and reviewing needs a user; on any other address every page needs a login."""
    port: int = field(default=8080, metadata=bounded(0, 65535))
    """HTTP port of the page; 0 = any free port (logged)."""
    feed_address: str = "tcp://127.0.0.1:5558"
    """ZeroMQ endpoint where the recorder announces what it has stored, for the page's live view."""
    window_min: float = field(default=5.0, metadata=bounded(0.1, 1440.0))
    """Minutes the live view's counts and reject rate cover."""


@dataclass(frozen=True)
class DriftConfig:
    enabled: bool = True
    """Watch each camera's pass scores against the bundle's held-out good frames (docs/runtime.md, Drift watch)."""
    quantile: float = field(default=0.5, metadata=bounded(0.1, 0.99))
    """Reference level: the held-out passes' score at this quantile; the watch counts passed parts above it.
    The median reacts to a darker or lighter scene far sooner than an upper quantile (bench/drift_bench.py)."""
    horizon_parts: int = field(default=10000, metadata=bounded(100, 10**9))
    false_alarm: float = field(default=0.01, metadata=bounded(1e-9, 0.5))
    """Without drift, an alarm within `horizon_parts` passed parts has at most this probability."""
    confidence: float = field(default=0.99, metadata=bounded(0.5, 0.999999))
    """Confidence of the reference's bound on the share of good parts above the reference level."""


@dataclass(frozen=True)
class GoldenConfig:
    enabled: bool = True
    """Push each bundle's golden frames (kept by `linewatch calibrate`) through the pipeline at start, before the
    cameras, and on `linewatch selftest`: a verdict other than the recorded one, or a score off by more than
    `score_tolerance`, fails readiness and raises the self-test alert until a later self-test passes."""
    every_h: float = field(default=0.0, metadata=bounded(0.0, 8760.0))
    """Also every this many hours while the run goes on (0: only at start and on demand)."""
    score_tolerance: float = field(default=0.1, metadata=bounded(0.0, 10.0))
    """Largest relative difference from the recorded score: bf16 on another CPU moves scores by up to ~3 %."""
    timeout_s: float = field(default=60.0, metadata=bounded(1.0, 3600.0))
    """A golden frame without a verdict this long after it was sent counts as failed."""


@dataclass(frozen=True)
class RuntimeConfig:
    """What the streaming runtime reads: the `pipeline`, `publisher`, `metrics`, `store`, `ui`, `drift` and
    `golden` sections."""

    pipeline: PipelineConfig = PipelineConfig()
    publisher: PublisherConfig = PublisherConfig()
    metrics: MetricsConfig = MetricsConfig()
    store: StoreConfig = StoreConfig()
    ui: UiConfig = UiConfig()
    drift: DriftConfig = DriftConfig()
    golden: GoldenConfig = GoldenConfig()
