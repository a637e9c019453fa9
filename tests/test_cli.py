"""End to end through the `linewatch` command line on generated data."""

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.app.cli import main

EVAL_KEYS = {
    "image_auroc",
    "pixel_auroc",
    "pro",
    "f1",
    "n_images",
    "ms_per_image",
    "fpr_at_threshold",
    "tpr_at_threshold",
}


@pytest.fixture(scope="module")
def bundle(small_category: Path, small_config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("b") / "brick.pt"
    rc = main(["fit", "--data", str(small_category), "--out", str(out), "--config", str(small_config_file), "--quiet"])
    assert rc == 0 and out.is_file()
    return out


def test_fit_then_evaluate_json(bundle: Path, small_category: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(small_category), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result) == EVAL_KEYS
    assert result["n_images"] == 14
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.9
    assert 0 < result["pro"] <= 1 and 0 < result["f1"] <= 1 and result["ms_per_image"] > 0
    assert result["fpr_at_threshold"] is None and result["tpr_at_threshold"] is None  # fit sets no threshold


def test_evaluate_names_a_model_weak_on_the_data_with_its_figures(
    bundle: Path, small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = tmp_path / "invisible"
    shutil.copytree(small_category, cat)
    goods = sorted((cat / "test" / "good").glob("*.png"))
    defects = sorted(p for p in (cat / "test").glob("*/*.png") if p.parent.name != "good")
    for i, path in enumerate(defects):  # "defects" that are good frames: nothing to detect
        shutil.copyfile(goods[i % len(goods)], path)
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(cat), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["image_auroc"] < 0.9
    weak = [line for line in captured.err.splitlines() if "detects poorly" in line]
    assert len(weak) == 1 and f"image AUROC {result['image_auroc']:.3f}" in weak[0] and "model.name" in weak[0]
    # ...and on data where it separates well, nothing is said.
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(small_category), "--json"]) == 0
    assert "detects poorly" not in capsys.readouterr().err


def test_evaluate_without_masks_reports_null(
    bundle: Path, small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = tmp_path / "nomask"
    shutil.copytree(small_category, cat)
    shutil.rmtree(cat / "ground_truth")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle), "--data", str(cat), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pixel_auroc"] is None and result["pro"] is None and result["image_auroc"] is not None


def test_padim_via_flag(
    small_category: Path, small_config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "padim.pt"
    assert (
        main(
            [
                "fit",
                "--data",
                str(small_category),
                "--out",
                str(out),
                "--model",
                "padim",
                "--config",
                str(small_config_file),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(small_category), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_auroc"] >= 0.8


def test_errors_are_one_line_with_exit_2(
    small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("model:\n  patchcore:\n    coreset_ratio: 2\n")
    cases = [
        ["fit", "--data", str(small_category), "--out", str(tmp_path / "x.pt"), "--config", str(bad_cfg)],
        ["fit", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")],
        ["evaluate", "--model", str(tmp_path / "none.pt"), "--data", str(small_category)],
    ]
    expected = [
        "bad.yaml: model.patchcore.coreset_ratio = 2: out of range",
        "nowhere: data folder does not exist",
        "none.pt: bundle file does not exist",
    ]
    for argv, msg in zip(cases, expected, strict=True):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("linewatch: error:") and msg in err[0]
    assert not (tmp_path / "x.pt").exists()


def test_skip_bad_fits_on_the_rest(
    small_category: Path, small_config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = tmp_path / "cat"
    shutil.copytree(small_category, cat)
    (cat / "train" / "good" / "005.png").write_bytes(b"broken")
    out = tmp_path / "m.pt"
    argv = ["fit", "--data", str(cat), "--out", str(out), "--config", str(small_config_file), "--quiet"]
    assert main(argv) == 2 and "005.png: cannot be decoded" in capsys.readouterr().err
    assert main([*argv, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad file(s)" in err and "005.png" in err and "on 15 images" in err


def test_console_script_runs(bundle: Path, small_category: Path) -> None:
    exe = Path(sys.executable).with_name("linewatch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.app.cli"]
    proc = subprocess.run(
        [*cmd, "evaluate", "--model", str(bundle), "--data", str(small_category), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == EVAL_KEYS


def test_bench_json_has_the_documented_keys(
    tmp_path: Path, small_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from calibration.calibrate import calibrate
    from calibration.datasets import normal_frames
    from edge.bundle import save_bundle
    from pipeline.app.config import config_from_dict

    config = config_from_dict({"model": {"input_size": 128}, "calibration": {"target_fpr": 0.2, "confidence": 0.8}})
    cal = calibrate(config, normal_frames(small_category))
    bundle = tmp_path / "b.pt"
    save_bundle(bundle, cal.fit.model, cal.manifest)
    capsys.readouterr()
    assert main(["bench", "--bundle", str(bundle), "--seconds", "1", "--batch", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {  # as README documents them
        "backbone_fps",
        "model_fps",
        "pipeline_fps",
        "pipeline_efficiency",
        "model_ms_p50",
        "model_ms_p99",
        "backbone_ms_p50",
        "bank_mb",
        "rss_mb",
        "store_sqlite_verdicts_per_s",
        "store_postgresql_verdicts_per_s",
        "store_off_ms_p50",
        "store_off_ms_p99",
        "store_on_ms_p50",
        "store_on_ms_p99",
        "store_p99_change",
        "store_off_decide_ms_p99",
        "store_on_decide_ms_p99",
        "store_off_p99_spread",
        "store_p99_change_low",
        "store_p99_change_high",
        "store_runs",
    }
    assert result["store_sqlite_verdicts_per_s"] > 0 and result["store_postgresql_verdicts_per_s"] is None
    assert 0 < result["store_off_ms_p50"] <= result["store_off_ms_p99"]
    assert 0 < result["store_on_ms_p50"] <= result["store_on_ms_p99"]
    assert 0 < result["store_on_decide_ms_p99"] < result["store_on_ms_p99"]
    assert result["store_off_p99_spread"] >= 0 and result["store_runs"] == 4
    assert -1 < result["store_p99_change_low"] <= result["store_p99_change_high"]
    assert result["store_p99_change"] == pytest.approx(result["store_on_ms_p99"] / result["store_off_ms_p99"] - 1)
    assert not (bundle.parent / "linewatch-data").exists()  # the bench's verdicts never join the line's
    # Which of two timed figures is larger is the benchmark's finding, not the test's: only signs here.
    assert result["backbone_fps"] > 0 and result["model_fps"] > 0 and result["pipeline_fps"] > 0
    assert result["pipeline_efficiency"] == pytest.approx(result["pipeline_fps"] / result["model_fps"])
    assert 0 < result["model_ms_p50"] <= result["model_ms_p99"] and result["bank_mb"] > 0 and result["rss_mb"] > 100
    assert result["backbone_ms_p50"] > 0
    # A batch the pipeline could not run is refused like the config value it overrides, before any work.
    for bad in ("0", "-3"):
        assert main(["bench", "--bundle", str(bundle), "--seconds", "1", "--batch", bad]) == 2
        err = capsys.readouterr().err.strip()
        expected = "out of range, expected a value >= 1 and <= 1024"
        assert err == f"linewatch: error: command line: pipeline.max_batch = {bad}: {expected}"
    if not torch.cuda.is_available():  # a device that is not there: one line, fallback allowed or not
        for fallback in ("false", "true"):
            cfg = tmp_path / f"cuda-{fallback}.yaml"
            cfg.write_text(f"pipeline:\n  device: cuda\n  backend_fallback: {fallback}\n")
            assert main(["bench", "--bundle", str(bundle), "--seconds", "1", "--config", str(cfg)]) == 2
            err = capsys.readouterr().err.strip()
            assert err == "linewatch: error: pipeline.device = cuda: no CUDA device is available on this machine"


def test_efficientad_calibrates_and_runs_in_the_pipeline(
    small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "ead.yaml"
    cfg.write_text(
        "model:\n  name: efficientad\n  input_size: 64\n"
        "  efficientad: {distill_steps: 3, steps: 10, precision: float32}\n"
        "calibration: {target_fpr: 0.2, confidence: 0.8, synthetic_per_kind: 4}\n"
    )
    out = tmp_path / "ead.pt"
    ckpt = tmp_path / "ead.ckpt"
    argv = ["calibrate", "--data", str(small_category), "--out", str(out), "--config", str(cfg), "--quiet"]
    assert main([*argv, "--checkpoint", str(ckpt)]) == 0
    assert ckpt.is_file()  # the run left its checkpoint; the same command again resumes it
    manifest = json.loads(__import__("torch").load(out, weights_only=True)["manifest"])
    assert manifest["model"] == "efficientad" and manifest["backbone"] is None
    assert manifest["threshold"]["value"] is not None
    info = manifest["fit"]["efficientad"]
    assert info["steps"] == 10 and info["distill_steps"] == 3 and info["norm_images"] >= 1
    assert "distilled from efficientnet_lite0" in manifest["model_params"]["teacher"]
    capsys.readouterr()
    assert main(["bench", "--bundle", str(out), "--seconds", "1", "--batch", "2", "--json", "--no-store"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Floor = the teacher alone; the pipeline replays frames through the EfficientAD bundle.
    # Which of two timed figures is larger is the benchmark's finding, not the test's: only signs here.
    assert result["backbone_fps"] > 0 and result["model_fps"] > 0 and result["pipeline_fps"] > 0
    # A teacher file that is not one is a one-line error naming it.
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a state dict")
    assert main([*argv, "--teacher", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.pth: not a teacher weights file" in err[0]


def test_interleaved_throughput_counts_only_each_calls_own_time() -> None:
    from pipeline.app.bench import interleaved_throughput

    now = [0.0]

    def takes(seconds: float) -> Callable[[], None]:
        def call() -> None:
            now[0] += seconds

        return call

    rates = interleaved_throughput({"floor": takes(0.010), "model": takes(0.025)}, 2, 1.0, lambda: now[0])
    # 2 items per call; the other function's time and the warm-up calls do not count.
    assert rates == {"floor": pytest.approx(2 / 0.010), "model": pytest.approx(2 / 0.025)}


def test_interleaved_bursts_leave_out_the_first_call_of_each_turn() -> None:
    from pipeline.app.bench import interleaved_call_seconds

    now = [0.0]
    log: list[str] = []

    def model(name: str, cold: float, warm: float) -> Callable[[], None]:
        def call() -> None:  # slow when the previous call was another model's (cold caches)
            now[0] += warm if log and log[-1] == name else cold
            log.append(name)

        return call

    fns = {"a": model("a", 0.030, 0.010), "b": model("b", 0.050, 0.020)}
    spent = interleaved_call_seconds(fns, rounds=4, clock=lambda: now[0], burst=3)
    assert log[2:] == (["a"] * 3 + ["b"] * 3) * 4  # one warm-up call each, then turns of 3
    assert spent == {"a": [pytest.approx(0.010)] * 8, "b": [pytest.approx(0.020)] * 8}
    log.clear()
    single = interleaved_call_seconds(fns, rounds=2, clock=lambda: now[0])
    assert single == {"a": [pytest.approx(0.030)] * 2, "b": [pytest.approx(0.050)] * 2}


def test_paced_loop_counts_the_wait_behind_a_slow_call_and_not_a_late_wake_up() -> None:
    from pipeline.app.bench import paced_loop_latencies_ms

    now = [0.0]
    durations = iter([0.005, 0.005, 0.025, 0.005, 0.005, 0.005])  # the warm-up call first

    def call() -> None:
        now[0] += next(durations)

    def sleep(seconds: float) -> None:
        now[0] += seconds + 0.001  # wakes a millisecond late

    lat = paced_loop_latencies_ms(call, 0.010, 0.045, lambda: now[0], sleep)
    # Parts due every 10 ms. The second finds the loop idle and counts from its late wake-up (25 ms, not
    # 26); the 25 ms call holds up the three after it, which count from when they were due and catch up
    # by 5 ms a part.
    assert lat == pytest.approx([5.0, 25.0, 21.0, 16.0, 11.0])


def test_bench_waits_for_a_cuda_device_before_the_clock_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.app.bench import completed

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))

    def infer() -> str:
        events.append("call")
        return "out"

    assert completed(infer, "cpu") is infer  # the CPU computes before returning: nothing to wait for
    assert completed(infer, "cuda:1")() == "out"
    assert events == ["call", "sync cuda:1"]


def test_version_and_help_answer_without_importing_torch() -> None:
    script = (
        "import sys\n"
        "from pipeline.app.cli import main\n"
        "for argv in (['--version'], ['--help'], ['calibrate', '--help'], ['run', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, argv\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("linewatch 0.1.0\n") and "--log-format" in proc.stdout
    assert proc.stdout.strip().endswith("no torch")


def test_every_option_has_help() -> None:
    import argparse

    from pipeline.app.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in [("linewatch", parser), *commands.choices.items()]
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert missing == []


def test_a_file_that_is_not_a_bundle_is_refused_in_one_line(
    tmp_path: Path, small_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # a real torch file that needs pickle: torch's page-long refusal
    expected = f"linewatch: error: {module}: not a linewatch bundle (a torch file of plain tensors was expected)"
    for argv in (
        ["run", "--bundle", str(module), "--source", f"folder:{small_category}"],
        ["evaluate", "--bundle", str(module), "--data", str(small_category)],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == expected


def test_calibrate_off_a_terminal_logs_progress_with_rate_and_eta(
    small_category: Path, small_config_file: Path, tmp_path: Path
) -> None:
    """Under systemd or `2>log`: timestamped INFO lines naming the command, with count, rate and ETA."""
    log = tmp_path / "log"
    argv = ["calibrate", "--data", str(small_category), "--out", str(tmp_path / "c.pt"), "--config"]
    argv += [str(small_config_file), "--target-fpr", "0.2", "--confidence", "0.8"]
    with log.open("w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "pipeline.app.cli", *argv], stderr=stderr, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    line = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO +\[calibrate\] (?P<label>[a-z -]+): (?P<n>\d+)/(?P<total>\d+) "
        r"\(\d+%\) elapsed [\d:]+, ETA [\d:?]+, +[\d.?]+ ?(it/s|s/it)$"
    )
    progress = [m for m in map(line.match, text.splitlines()) if m]
    assert {"features", "held-out"} <= {m["label"] for m in progress}, text
    assert any(m["n"] == m["total"] for m in progress if m["label"] == "held-out")  # the closing line
    assert "\r" not in text and "#" not in text  # no bar redrawn in place


def test_log_format_json_gives_one_object_a_line(
    bundle: Path, small_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    argv = ["--log-format", "json", "evaluate", "--bundle", str(bundle), "--data", str(small_category)]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in err]
    assert records and {"time", "level", "stage", "logger", "message"} <= set(records[0])
    assert {r["stage"] for r in records} == {"evaluate"} and all(r["level"] == "info" for r in records)
    assert records[-1]["message"].startswith("evaluate: 14/14 (100%)")


def test_distil_teacher_writes_a_teacher_file_and_refuses_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "teacher.pt"
    argv = ["distil-teacher", "--out", str(out), "--side", "64", "--steps", "2", "--batch", "2", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"teacher {out} (sha256 " in text and "step 2 of 2" in text
    assert re.search(r"held-out distillation loss \d+\.\d{4} at step 0, \d+\.\d{4} at step 2", text)
    assert torch.load(out, weights_only=True)["record"]["steps_done"] == 2
    for bad, message in (
        (["--checkpoint-every", "0"], "--checkpoint-every 0: expected 1 or more"),
        (["--side", "100"], "side = 100: expected a multiple of 32"),
        (["--device", "cuda:99"], "cuda:99"),
    ):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("linewatch: error: ") and message in err[0]


def test_a_box_without_opencv_is_told_which_extra_to_install() -> None:
    # OpenCV is the `opencv` extra, so that an OpenCV build already on the box is kept; without any, one line.
    code = "import sys; sys.modules['cv2'] = None; from pipeline.app.cli import main; sys.exit(main(['run']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "linewatch: error: OpenCV is not installed: pip install 'linewatch[opencv]', or keep the opencv-python "
        "build this box already has"
    )
