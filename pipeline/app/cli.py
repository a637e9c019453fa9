"""The `linewatch` command line: fit, calibrate, evaluate, run, bench, demo, history, export.

Every expected failure (bad config, unreadable data, missing weights, tampered bundle) ends with one
line `linewatch: error: ...` on stderr and exit status 2; stdout carries only results. Diagnostics go
through `logging`, configured here once (`--log-level`, `--log-format`). The heavy layers (torch and
the models) are imported by the command that needs them, so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.logs import LOG_FORMATS, LOG_LEVELS, LogSettings, configure_logging

if TYPE_CHECKING:
    from pipeline.app.config import Config
    from pipeline.app.history import StoreLocation
    from pipeline.supervisor import RunSummary

EXIT_ERROR = 2
EXIT_SELFTEST_FAILED = 1  # linewatch selftest: a bundle in charge failed its golden self-test
EXIT_RUN_FAILED = 3  # the run started but ended as a failure: a stage kept failing, or no frame arrived
log = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config file (default: built-in defaults, as in config.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable or mismatched files and report them")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that fit a model (fit, calibrate)."""
    p.add_argument("--model", dest="model_name", metavar="NAME", help="patchcore, padim or efficientad (model.name)")
    p.add_argument("--backbone", metavar="NAME", help="feature extractor, see README Backbones (model.backbone)")
    p.add_argument("--backbone-weights", help="path to the backbone's .pth weights (model.backbone_weights)")
    p.add_argument("--seed", type=int, help="seed of the fit and of the calibration split (fit.seed)")
    p.add_argument("--teacher", help="EfficientAD teacher PDN weights (.pth); default: distil one here")
    p.add_argument("--distill-images", help="EfficientAD: folder of generic images for distillation and the penalty")
    p.add_argument("--steps", type=int, help="EfficientAD training steps (default: model.efficientad.steps)")
    p.add_argument("--checkpoint", help="EfficientAD training checkpoint: resumed when it exists")


def _add_bundle(p: argparse.ArgumentParser, help_text: str, required: bool = True, alias: bool = False) -> None:
    flags = ("--bundle", "--model") if alias else ("--bundle",)  # evaluate's --model: the name before --bundle
    p.add_argument(*flags, dest="bundle", required=required, type=Path, help=help_text)


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """Where the commands that read the verdict store find it."""
    p.add_argument("--config", type=Path, help="config file (store.path, store.url, pipeline.bundle)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--bundle", type=Path, help="bundle whose data folder holds the store (overrides pipeline.bundle)"
    )
    where.add_argument("--data", type=Path, help="data folder holding verdicts.sqlite and images/")
    p.add_argument("--store-url", metavar="URL", help="database of the store (e.g. postgresql+psycopg://...)")


def _store_location(args: argparse.Namespace) -> StoreLocation:
    from pipeline.app.config import load_config, with_overrides
    from pipeline.app.history import locate
    from pipeline.app.library import check_data_folder, names_by_hash

    config = load_config(args.config)  # not _config: no override and no torch for a read of the store
    bundle = args.bundle or config.pipeline.bundle
    if names_by_hash(str(bundle)) and args.data is None and args.store_url is None:  # store.path's, not the library's
        check_data_folder(with_overrides(config, {"pipeline.bundle": str(bundle)}))
        bundle = None
    return locate(config.store, bundle, args.data, args.store_url)


def _config(args: argparse.Namespace) -> Config:
    from pipeline.app.config import load_config, with_overrides

    config = load_config(getattr(args, "config", None))
    overrides = {
        "model.name": getattr(args, "model_name", None),
        "model.backbone": getattr(args, "backbone", None),
        "model.backbone_weights": getattr(args, "backbone_weights", None),
        "model.efficientad.teacher": getattr(args, "teacher", None),
        "model.efficientad.distill_images": getattr(args, "distill_images", None),
        "model.efficientad.steps": getattr(args, "steps", None),
        "model.efficientad.checkpoint": getattr(args, "checkpoint", None),
        "fit.seed": getattr(args, "seed", None),
        "calibration.seed": getattr(args, "seed", None),
        "calibration.target_fpr": getattr(args, "target_fpr", None),
        "calibration.confidence": getattr(args, "confidence", None),
        "calibration.holdout_fraction": getattr(args, "holdout", None),
        "calibration.allow_weak_bound": True if getattr(args, "allow_weak_bound", False) else None,
        "pipeline.backend": getattr(args, "backend_name", None),
        "pipeline.max_batch": getattr(args, "batch", None),  # bench: validated like the config value
    }
    config = with_overrides(config, overrides)
    if config.fit.threads:
        import torch

        torch.set_num_threads(config.fit.threads)
    return config


def cmd_fit(args: argparse.Namespace) -> int:
    from calibration.datasets import normal_frames
    from calibration.fit import fit
    from edge.bundle import save_bundle

    config = _config(args)
    samples = normal_frames(args.data)
    result = fit(config, samples, skip_bad=args.skip_bad, progress=not args.quiet)
    result.skipped.log()
    digest = save_bundle(args.out, result.model, result.manifest)
    log.info(
        "fitted %s (%s) on %d images in %.1fs -> %s (hash %s)",
        config.model.name,
        result.manifest.feature_extractor,
        result.manifest.dataset.n_images,
        result.seconds,
        args.out,
        digest[:12],
    )
    return 0


# calibrate's options that only one of its two forms takes: (dest, flag).
_FIT_ONLY = (
    ("model_name", "--model"),
    ("backbone", "--backbone"),
    ("seed", "--seed"),
    ("teacher", "--teacher"),
    ("distill_images", "--distill-images"),
    ("steps", "--steps"),
    ("checkpoint", "--checkpoint"),
    ("holdout", "--holdout"),
    ("skip_bad", "--skip-bad"),
)
_STORE_ONLY = (
    ("bundle", "--bundle"),
    ("since", "--since"),
    ("until", "--until"),
    ("camera", "--camera"),
    ("store_url", "--store-url"),
)


def _check_calibrate_form(args: argparse.Namespace) -> None:
    """One-line errors for a mix of the two forms: fit on --data, or re-choose on the store's frames."""
    if args.from_store:
        if args.data is not None:
            raise ValueError(
                "--data: not with --from-store (the frames come from the verdict store, found beside --bundle or at "
                "store.path of --config)"
            )
        if args.bundle is None:
            raise ValueError(
                "--bundle: required with --from-store (the calibrated bundle whose threshold is re-chosen)"
            )
        wrong, why = _FIT_ONLY, "only when fitting on --data: --from-store does not refit the model"
    else:
        if args.data is None:
            raise ValueError(
                "--data: required (normal frames to fit and calibrate on), or give --from-store --bundle B"
            )
        wrong, why = _STORE_ONLY, "only with --from-store"
    given = [flag for dest, flag in wrong if getattr(args, dest) not in (None, False)]
    if given:
        raise ValueError(f"{given[0]}: {why}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    _check_calibrate_form(args)
    if args.from_store:
        return _calibrate_from_store(args)
    from calibration.calibrate import calibrate
    from calibration.datasets import MVTecCategory, normal_frames
    from calibration.report import write_report
    from edge.bundle import save_bundle

    config = _config(args)
    samples = normal_frames(args.data)
    test = MVTecCategory(args.data) if (Path(args.data) / "train" / "good").is_dir() else None
    cal = calibrate(config, samples, test, skip_bad=args.skip_bad, progress=not args.quiet)
    cal.skipped.log()
    digest = save_bundle(args.out, cal.fit.model, cal.manifest, cal.golden)
    report_dir = args.report_dir or Path(args.out).parent
    write_report(report_dir, cal, Path(args.out), digest)
    c = cal.choice
    bound = "meets" if c.meets_target else "MISSES"
    lines = [
        f"threshold {c.threshold:.4g} (reject when score > threshold): held-out good frames n={c.n}, k={c.k}",
        f"  false-reject rate <= {c.fpr_bound:.4f} with {c.confidence:.0%} confidence ({bound} target {c.target_fpr:g};"
        f" P(rate > target) = {c.exceed_probability:.4f})",
        f"  plain {1 - c.target_fpr:.0%} quantile would be {c.empirical_threshold:.4g}"
        f" (P(rate > target) = {c.empirical_exceed_probability:.2f})",
    ]
    for r in cal.synthetic_recall:
        low, high = r.interval
        lines.append(f"  synthetic {r.label:8s} detected {r.hits}/{r.n} = {r.value:.1%} (95% CI {low:.1%}-{high:.1%})")
    if cal.labelled is not None:
        lab = cal.labelled
        lines.append(
            f"  real test set: false rejects {lab.fpr.hits}/{lab.fpr.n},"
            f" defects detected {lab.recall.hits}/{lab.recall.n}"
        )
    lines.append(f"bundle {args.out} (hash {digest[:12]}), report {report_dir / 'report.html'}")
    print("\n".join(lines))
    if (weak := cal.weakness()) is not None:
        log.warning("%s", weak)
    return 0


def _calibrate_from_store(args: argparse.Namespace) -> int:
    from edge.bundle import load_bundle
    from pipeline.app.history import locate
    from pipeline.app.recalibrate import period_of, recalibrate_from_store, summary_lines, write_store_report

    if args.out.resolve() == args.bundle.resolve():
        raise ValueError(f"--out {args.out}: the same file as --bundle (write the new bundle beside it)")
    config = _config(args)
    period = period_of(args.since, args.until, args.camera, time.time_ns())
    location = locate(config.store, args.bundle, None, args.store_url)
    bundle = load_bundle(args.bundle, config.model.backbone_weights)
    r = recalibrate_from_store(bundle, args.out, location, period, config, progress=not args.quiet)
    report = write_store_report(args.report_dir or args.out.parent, r, args.out)
    print("\n".join(summary_lines(r, args.out, report)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from calibration.datasets import MVTecCategory
    from calibration.evaluate import evaluate, format_metric
    from calibration.metrics import weakness
    from edge.bundle import load_bundle

    bundle = load_bundle(args.bundle, args.backbone_weights)
    category = MVTecCategory(args.data)
    result, report = evaluate(bundle, category, skip_bad=args.skip_bad, progress=not (args.quiet or args.json))
    report.log()
    figures = {"image AUROC": result.image_auroc, "pixel AUROC": result.pixel_auroc}
    if (weak := weakness(bundle.manifest.model, figures)) is not None:
        log.warning("%s", weak)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    r = result
    print(
        f"{category.name}: image AUROC {format_metric(r.image_auroc, 6)}  pixel AUROC {format_metric(r.pixel_auroc, 6)}"
        f"  PRO {format_metric(r.pro, 6)}  F1 {format_metric(r.f1, 6)}  images {r.n_images}  "
        f"{r.ms_per_image:.1f} ms/image"
    )
    if r.fpr_at_threshold is not None or r.tpr_at_threshold is not None:
        print(
            f"  at threshold {bundle.threshold:.4g}: false-reject rate {format_metric(r.fpr_at_threshold, 6)}"
            f"  defects detected {format_metric(r.tpr_at_threshold, 6)}"
        )
    return 0


def cmd_distil_teacher(args: argparse.Namespace) -> int:
    from calibration.teacher_distillation import DistillationSettings, distil
    from edge.backbones import file_sha256

    settings = DistillationSettings(
        size=args.size,
        side=args.side,
        steps=args.steps,
        batch_size=args.batch,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    for name, least in (("checkpoint_every", 1), ("eval_every", 1), ("stop_after", 1), ("workers", 0)):
        if (value := getattr(args, name)) is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected {least} or more")
    d = distil(
        settings, args.out, args.checkpoint, args.device, args.precision, args.checkpoint_every, args.eval_every,
        args.stop_after, progress=not args.quiet, workers=args.workers,
    )  # fmt: skip
    losses = d.held_out_loss
    print(f"teacher {args.out} (sha256 {file_sha256(args.out)[:16]}): step {d.step} of {settings.steps}")
    if losses:
        print(f"  held-out distillation loss {losses[0][1]:.4f} at step {losses[0][0]}, {losses[-1][1]:.4f} at step"
              f" {losses[-1][0]}")  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.app.config import ConfigError, with_overrides
    from pipeline.app.library import check_data_folder, resolve_bundles
    from pipeline.settings import SourceConfig
    from pipeline.supervisor import Pipeline

    config = _config(args)
    if args.bundle is not None:  # --bundle may name a library bundle by hash too
        config = with_overrides(config, {"pipeline.bundle": str(args.bundle)})
    given = tuple(SourceConfig(spec=s) for s in args.source) if args.source else None  # --source replaces them
    check_data_folder(config, given)
    config = resolve_bundles(config)
    bundle = config.pipeline.bundle
    sources = given or config.pipeline.sources
    if bundle is None and not (sources and all(s.bundle for s in sources)):
        raise ConfigError("pipeline.bundle: no bundle given (pass --bundle, set it, or name one per source)")
    pipeline = Pipeline(
        config,
        None if bundle is None else Path(bundle),
        sources,
        backbone_weights=config.model.backbone_weights,
        log_settings=args.log_settings,
    )
    summary = pipeline.run(duration_s=args.duration)
    if args.json:
        print(json.dumps(summary.headline()))
    else:
        _print_run(summary)
    if summary.failure is not None:
        print(f"linewatch: run failed: {summary.failure}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def cmd_switch(args: argparse.Namespace) -> int:
    import getpass
    import socket

    from pipeline.app.config import ConfigError
    from pipeline.app.library import resolve_reference
    from pipeline.changeover import SwitchRequest, ask_switch

    config = _config(args)
    address = args.address or config.pipeline.control_address
    if address is None:
        raise ConfigError("pipeline.control_address: null, so the run takes no changeover requests (give --address)")
    bundle = None
    if args.bundle is not None:  # a file is named from where this command runs, not from where the run started
        bundle = str(Path(resolve_reference(args.bundle, config.pipeline.bundle_library, "--bundle")).resolve())
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()}"
    shadow = args.shadow or args.stop_shadow
    request = SwitchRequest(args.camera, bundle, args.recipe, by, shadow, args.promote)
    outcome = ask_switch(address, request, args.timeout)
    if not outcome.switched:
        print(f"linewatch: switch refused: {outcome.error}", file=sys.stderr)
        return EXIT_ERROR
    before, after = (outcome.from_bundle or "none")[:12], (outcome.to_bundle or "none")[:12]
    which = "shadow bundle" if outcome.shadow else "bundle"
    if before == after:
        print(f"camera {outcome.camera}: {which} already {after}")
    else:
        loading = f" ({outcome.load_ms:.0f} ms to load)" if outcome.load_ms else ""
        print(f"camera {outcome.camera}: {which} switched from {before} to {after}{loading}")
    return 0


def cmd_library(args: argparse.Namespace) -> int:
    from pipeline.app.config import ConfigError
    from pipeline.app.library import BundleLibrary

    folder = args.library or _config(args).pipeline.bundle_library
    if folder is None:
        raise ConfigError("pipeline.bundle_library: not set (give --library)")
    library = BundleLibrary(Path(folder))
    if args.action == "add":
        if not args.bundles:
            raise ConfigError("library add: name the bundle files to add")
        for bundle in args.bundles:
            print(f"sha256:{library.add(bundle)}  {bundle}")
        return 0
    for e in library.entries():
        threshold = "not calibrated" if e.threshold is None else f"threshold {e.threshold:.4g}"
        print(f"sha256:{e.hash}  {e.model}, {threshold}, fitted on {e.fit_images} images, {e.created}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    import getpass
    import socket

    from pipeline.app.config import ConfigError
    from pipeline.changeover import SelfTestRequest, ask_selftest

    address = args.address or _config(args).pipeline.control_address
    if address is None:
        raise ConfigError("pipeline.control_address: null, so the run takes no requests (give --address)")
    outcome = ask_selftest(address, SelfTestRequest(f"{getpass.getuser()}@{socket.gethostname()}"), args.timeout)
    if outcome.error is not None:
        print(f"linewatch: no self-test: {outcome.error}", file=sys.stderr)
        return EXIT_ERROR
    for r in outcome.results:
        head = f"{Path(r['path']).name} (bundle {r['bundle'][:12]}), {r['frames']} golden frames"
        print(f"{head}: passed" if not r["failures"] else f"{head}: FAILED")
        for failure in r["failures"]:
            print(f"  {failure}")
    return 0 if outcome.passed else EXIT_SELFTEST_FAILED


def _print_run(summary: RunSummary) -> None:
    p50, p99 = summary.latency_ms_p50, summary.latency_ms_p99
    lat = "n/a" if p50 is None or p99 is None else f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    print(
        f"frames {summary.frames}: {summary.verdicts} verdicts ({summary.rejects} rejects, "
        f"{summary.errors} errors), {summary.drops} dropped, {summary.restarts} restarts; "
        f"latency {lat}; {summary.fps:.1f} frames/s"
    )
    for cam, counts in summary.cameras.items():
        print(f"  {cam}: {counts}")
    if summary.drops:
        print(f"  drops by reason: {summary.drops_by_reason}")
    if summary.stored is not None:
        lost = f", {summary.store_lost} NOT recorded (spool full)" if summary.store_lost else ""
        print(f"  run {summary.run_id}: {summary.stored} verdicts in the store{lost}")


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.app.bench import run_bench
    from pipeline.app.store_bench import INTERVAL_LEVEL

    config = _config(args)
    r = run_bench(
        Path(args.bundle),
        config,
        config.pipeline.max_batch,
        args.seconds,
        args.data,
        args.log_settings,
        store_section=not args.no_store,
        store_url=args.store_url,
    )
    if args.json:
        print(json.dumps(r.to_json()))
        return 0
    print(f"backbone alone (batch {r.batch}): {r.backbone_fps:8.1f} frames/s   (the floor)")
    ratio = r.model_fps / r.backbone_fps
    print(f"model (batch {r.batch}):          {r.model_fps:8.1f} frames/s   = {ratio:.2f} x backbone")
    print(f"backbone latency (batch 1): p50 {r.backbone_ms_p50:.1f} ms")
    ratio = r.model_ms_p50 / r.backbone_ms_p50
    lat = f"p50 {r.model_ms_p50:.1f} ms, p99 {r.model_ms_p99:.1f} ms"
    print(f"model latency (batch 1):   {lat}   = {ratio:.2f} x backbone")
    print(f"pipeline (block replay):   {r.pipeline_fps:8.1f} frames/s   = {r.pipeline_efficiency:.2f} x model")
    if r.pipeline_cpu:
        print("  CPU cores per process: " + ", ".join(f"{k} {v:.2f}" for k, v in r.pipeline_cpu.items()))
    print(f"memory bank: {r.bank_mb:.1f} MB; peak RSS of this process: {r.rss_mb:.0f} MB")
    if (s := r.store) is not None:
        pg = "n/a (give --store-url)" if s.postgresql_verdicts_per_s is None else f"{s.postgresql_verdicts_per_s:.0f}"
        print(f"recorder: SQLite {s.sqlite_verdicts_per_s:.0f} verdicts/s, PostgreSQL {pg} verdicts/s")
        print(
            f"latency at half the pipeline's rate: store off p50 {s.off_ms_p50:.1f} ms, p99 {s.off_ms_p99:.1f} ms;"
            f" store on p50 {s.on_ms_p50:.1f} ms, p99 {s.on_ms_p99:.1f} ms (p99 {s.p99_change:+.1%})"
        )
        interval = f"{s.p99_change_low:+.1%} to {s.p99_change_high:+.1%}"
        print(f"  p99 change, {INTERVAL_LEVEL:.0%} bootstrap interval over {s.runs} runs per setting: {interval}")
        print(f"  p99 between two halves of the store-off runs (this box's noise): ±{s.off_p99_spread:.1%}")
        decide = f"p99 {s.off_decide_ms_p99:.2f} ms off, {s.on_decide_ms_p99:.2f} ms on"
        print(f"  decide stage (inference done to published): {decide}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.app.demo import run_demo

    return run_demo(args.workdir, quiet=args.quiet, n_train=args.n_train, log_settings=args.log_settings)


def cmd_history(args: argparse.Namespace) -> int:
    from pipeline.app.history import history_filter, open_store, write_history

    f = history_filter(
        args.since,
        args.until,
        args.camera,
        args.verdict,
        args.min_score,
        args.max_score,
        args.run,
        args.limit,
        time.time_ns(),
        args.disagreements,
    )
    store = open_store(_store_location(args))
    try:
        rows = store.search(f)
    finally:
        store.close()
    write_history(rows, "csv" if args.csv else "json" if args.json else "table", sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.app.history import export_run, open_store

    location = _store_location(args)
    store = open_store(location)
    try:
        s = export_run(store, location.images, args.run, args.out)
    finally:
        store.close()
    missing = f", {s.missing} not found in the archive" if s.missing else ""
    print(f"run {args.run}: {s.rows} verdicts, {s.images} images, {s.expired} expired{missing} -> {args.out}")
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from pipeline.app.operators import add_user, list_users, read_password
    from pipeline.store.verdicts import public_url

    location = _store_location(args)
    if args.action == "list":
        for name in list_users(location):
            print(name)
        return 0
    if not args.name:
        raise ValueError("user add: expected a user NAME")
    new = add_user(location, args.name, read_password(args.password_stdin))
    print(f"user {args.name}: {'added' if new else 'password changed'} in {public_url(location.url)}")
    return 0


def cmd_station(args: argparse.Namespace) -> int:
    from pipeline.app.config import load_config, with_overrides
    from pipeline.app.library import resolve_reference
    from pipeline.app.operators import serve_station, station_settings

    config = with_overrides(load_config(args.config), {"ui.host": args.host, "ui.port": args.port})
    named = args.bundle or config.pipeline.bundle
    library = config.pipeline.bundle_library
    bundle = None if named is None else Path(resolve_reference(str(named), library, "pipeline.bundle"))
    serve_station(station_settings(_store_location(args), config.ui, bundle))
    return 0


# A relative time starts with '-', which argparse would read as an option: `--since -15m` is glued into
# `--since=-15m` before parsing.
_TIME_FLAGS = ("--since", "--until")
_TIME_FORMS = "ISO 8601 (2026-12-03T10:00, local time unless a zone is given) or before now: -15m, -2h, -1d"
_RELATIVE_TIME = re.compile(r"-\d")


def _glue_relative_times(argv: Sequence[str]) -> list[str]:
    glued: list[str] = []
    for arg in argv:
        if glued and glued[-1] in _TIME_FLAGS and _RELATIVE_TIME.match(arg):
            glued[-1] = f"{glued[-1]}={arg}"
        else:
            glued.append(arg)
    return glued


def _version() -> str:
    try:
        return metadata.version("linewatch")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linewatch", description="Real-time camera inspection for factory lines.")
    parser.add_argument("--version", action="version", version=f"linewatch {_version()}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="least severe log lines shown")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text lines, or one JSON object a line"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a model on normal frames and write a bundle")
    p.add_argument("--data", required=True, type=Path, help="MVTec AD category or folder of normal images")
    p.add_argument("--out", required=True, type=Path, help="bundle file to write")
    _add_model_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "calibrate",
        help="fit on normal frames and choose a threshold with a false-reject bound (--from-store: re-choose it on the"
        " line's archived frames)",
    )
    p.add_argument("--data", type=Path, help="MVTec AD category or folder of normal images (not with --from-store)")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="bundle file to write (report.html goes next to it)",
    )
    p.add_argument(
        "--from-store",
        action="store_true",
        help="re-choose --bundle's threshold on the line's archived passed frames (no refit, no --data)",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        help="--from-store: the calibrated bundle (its data folder, or store.path, has the store)",
    )
    p.add_argument("--since", metavar="TIME", help=f"--from-store: frames decided at or after TIME: {_TIME_FORMS}")
    p.add_argument("--until", metavar="TIME", help="--from-store: frames decided before TIME (default: now)")
    p.add_argument("--camera", help="--from-store: only this camera's frames")
    p.add_argument("--store-url", metavar="URL", help="--from-store: database of the store (default: store.url)")
    p.add_argument("--target-fpr", type=float, help="false-reject rate to stay under (default 0.01)")
    p.add_argument("--confidence", type=float, help="probability the bound holds (default 0.95)")
    p.add_argument("--holdout", type=float, help="share of normal frames held out for the threshold (default 0.5)")
    p.add_argument("--allow-weak-bound", action="store_true", help="too few frames: use the max score, say so")
    p.add_argument("--report-dir", type=Path, help="where report.html and its PNGs go (default: next to --out)")
    _add_model_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="score an MVTec AD category's test set")
    _add_bundle(p, "bundle written by fit or calibrate (--model: deprecated spelling)", alias=True)
    p.add_argument("--data", required=True, type=Path, help="MVTec AD category folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--backbone-weights", help="path to the backbone's .pth weights")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "distil-teacher",
        help="distil an EfficientAD teacher on the offline corpus (procedural images and packaged photographs)"
        " into a file for model.efficientad.teacher; resumable",
    )
    p.add_argument("--out", required=True, type=Path, help="teacher file to write")
    p.add_argument("--size", default="small", help="PDN size: small or medium")
    p.add_argument("--steps", type=int, default=60_000, help="batches in the whole distillation (cosine schedule)")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--side", type=int, default=256, help="image side in pixels (a multiple of 32)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's starting rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the networks and the corpus")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", help="float32, bfloat16 or auto (bf16 on CPUs with AMX)")
    p.add_argument("--checkpoint", type=Path, help="resume from and save to this file")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between held-out loss measurements")
    p.add_argument("--stop-after", type=int, help="end this run after so many steps (resume it later)")
    p.add_argument("--workers", type=int, default=0, help="processes drawing the corpus images (0: in this one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distil_teacher)

    p = sub.add_parser("run", help="run the streaming pipeline: sources -> model -> rejects over ZeroMQ")
    p.add_argument("--config", type=Path, help="config file (default: built-in defaults, as in config.yaml)")
    _add_bundle(p, "calibrated bundle (overrides pipeline.bundle)", required=False)
    p.add_argument(
        "--source",
        action="append",
        help="folder:PATH, video:PATH or camera:INDEX_OR_URL; repeat for several cameras (replaces the config's)",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--backend", dest="backend_name", metavar="NAME", help="torch, compile or tensorrt (pipeline.backend)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("switch", help="put a camera of the running `linewatch run` on another bundle (changeover)")
    p.add_argument("--camera", required=True, help="camera id (pipeline.sources[].id)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bundle", help="calibrated bundle file, or sha256:HASH of pipeline.bundle_library")
    target.add_argument("--recipe", help="a name of pipeline.recipes in the run's config")
    target.add_argument("--promote", action="store_true", help="put the camera's shadow bundle in charge")
    target.add_argument("--stop-shadow", action="store_true", help="stop scoring the camera's frames in shadow")
    p.add_argument("--shadow", action="store_true", help="run --bundle / --recipe in shadow: stored, never published")
    p.add_argument("--config", type=Path, help="config file (pipeline.control_address)")
    p.add_argument("--address", help="the run's control endpoint (default: pipeline.control_address)")
    p.add_argument("--by", help="who asks, for the store's record (default: user@host)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the outcome (default 120)")
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("selftest", help="push the golden frames of every bundle in charge through the running line")
    p.add_argument("--config", type=Path, help="config file (pipeline.control_address)")
    p.add_argument("--address", help="the run's control endpoint (default: pipeline.control_address)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the outcome (default 120)")
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("bench", help="measure backbone, model and pipeline speed of a bundle on this box")
    _add_bundle(p, "bundle to measure (calibrated, for the pipeline)")
    p.add_argument("--data", type=Path, help="folder to replay (default: generated noise frames)")
    p.add_argument("--batch", type=int, help="batch size for throughput (default: pipeline.max_batch)")
    p.add_argument(
        "--backend", dest="backend_name", metavar="NAME", help="torch, compile or tensorrt (pipeline.backend)"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time per figure (default 20)")
    p.add_argument("--no-store", action="store_true", help="skip the store section (recorder, latency store on/off)")
    p.add_argument("--store-url", help="PostgreSQL URL for the recorder figure (a database the bench may write to)")
    p.add_argument("--config", type=Path, help="config file (pipeline settings)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="generate a demo dataset, fit, evaluate, calibrate and replay it as a line")
    p.add_argument("--workdir", type=Path, default=Path("linewatch-demo"), help="where data and bundles go")
    p.add_argument("--n-train", type=int, default=100, help="normal training images per category")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("library", help="bundles named by content hash, for a deployment to name by sha256:HASH")
    p.add_argument("action", choices=["add", "list"], help="add bundles, or list the library")
    p.add_argument("bundles", nargs="*", type=Path, help="bundle files to add")
    p.add_argument("--library", type=Path, help="the library folder (default: pipeline.bundle_library)")
    p.add_argument("--config", type=Path, help="config file (pipeline.bundle_library)")
    p.set_defaults(func=cmd_library)

    p = sub.add_parser("history", help="list stored verdicts, filtered by time, camera, verdict, score or run")
    _add_store_options(p)
    p.add_argument("--since", metavar="TIME", help=f"decided at or after TIME: {_TIME_FORMS}")
    p.add_argument("--until", metavar="TIME", help="decided before TIME (same forms)")
    p.add_argument("--camera", help="only this camera id")
    p.add_argument("--verdict", choices=("pass", "reject", "error"), help="only this verdict")
    p.add_argument("--min-score", type=float, metavar="X", help="score >= X (leaves out errors, which have none)")
    p.add_argument("--max-score", type=float, metavar="X", help="score <= X")
    p.add_argument("--run", help="only this run id")
    p.add_argument(
        "--disagreements", action="store_true", help="only frames the camera's shadow bundle decided otherwise"
    )
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="newest N rows (default 1000; 0 = all)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="CSV with a header line instead of a table")
    form.add_argument("--json", action="store_true", help="one JSON object a line instead of a table")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("export", help="write one run's verdicts, record and images into a new folder")
    _add_store_options(p)
    p.add_argument("--run", required=True, help="run id (linewatch history shows them)")
    p.add_argument("--out", required=True, type=Path, help="new or empty folder to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("user", help="add a reviewer of the operator page (or change a password), or list them")
    _add_store_options(p)
    p.add_argument("action", choices=("add", "list"))
    p.add_argument("name", nargs="?", help="user name (add)")
    p.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("station", help="serve the operator page over a store, with no run on this box")
    _add_store_options(p)
    p.add_argument("--host", help="address to listen on (ui.host; not 127.0.0.1: login for every page)")
    p.add_argument("--port", type=int, help="port (ui.port)")
    p.set_defaults(func=cmd_station)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the user's to fix besides ValueError and OSError: a one-line message, not a traceback.
    The runtime's are named so that an unexpected RuntimeError still shows its trace."""
    from edge.backends import BackendError
    from pipeline.state import PipelineError
    from pipeline.store.verdicts import StoreError

    return (PipelineError, BackendError, StoreError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_glue_relative_times(sys.argv[1:] if argv is None else argv))
    if importlib.util.find_spec("cv2") is None:
        print(
            "linewatch: error: OpenCV is not installed: pip install 'linewatch[opencv]', or keep the opencv-python "
            "build this box already has",
            file=sys.stderr,
        )
        return EXIT_ERROR
    args.log_settings = LogSettings(args.log_level, args.log_format)
    configure_logging(args.log_settings, args.command)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("linewatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, ValueError | OSError) and not isinstance(exc, _expected_errors()):
            raise
        print(f"linewatch: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
