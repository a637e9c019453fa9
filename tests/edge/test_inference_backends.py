import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from calibration.datasets import SkipReport, normal_frames
from calibration.fit import fit_patchcore, preprocess_samples
from edge.backbones import get_spec, load_backbone
from edge.backends import BackendError, PreparedModel, check_backend, engine_key, prepare_backend
from edge.models.patchcore import PatchCoreModel
from edge.scoring import ScoreResult


@pytest.fixture(scope="module")
def fitted(small_category: Path) -> tuple[PatchCoreModel, torch.Tensor]:
    pre = get_spec("efficientnet_lite0").preprocessing(128)
    images = preprocess_samples(normal_frames(small_category)[:8], pre, False, SkipReport())
    model = fit_patchcore(load_backbone("efficientnet_lite0").module, images[:6], coreset_ratio=0.1)
    return model.eval(), images[6:8].contiguous(memory_format=torch.channels_last)


def test_torch_backend_is_the_eager_model(fitted: tuple[PatchCoreModel, torch.Tensor], tmp_path: Path) -> None:
    model, x = fitted
    prepared = prepare_backend(model, "torch", "cpu", x, tmp_path, "h")
    with torch.inference_mode():
        assert torch.equal(prepared(x).scores, model(x).scores)
    assert prepared.backend == "torch" and prepared.static_batch is None


def test_static_batch_pads_partial_batches(fitted: tuple[PatchCoreModel, torch.Tensor]) -> None:
    model, x = fitted
    seen: list[int] = []

    def run(batch: torch.Tensor):  # noqa: ANN202 - a stand-in engine that only takes batch 4
        seen.append(batch.shape[0])
        return model(batch)

    prepared = PreparedModel(run, "tensorrt", static_batch=4)
    with torch.inference_mode():
        out, ref = prepared(x), model(x)
    assert seen == [4] and out.scores.shape == (2,) and out.maps.shape == (2, 128, 128)
    assert torch.allclose(out.scores, ref.scores, rtol=1e-5)
    with pytest.raises(ValueError, match="larger than the engine's static batch 4"):
        prepared(torch.cat([x, x, x]))


def test_tensorrt_without_cuda_is_refused_or_falls_back_when_allowed(
    fitted: tuple[PatchCoreModel, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, x = fitted
    with pytest.raises(BackendError, match=r"tensorrt needs a CUDA device \(pipeline.device = cpu"):
        prepare_backend(model, "tensorrt", "cpu", x, tmp_path, "h")
    with pytest.raises(BackendError, match="tensorrt needs a CUDA device"):
        check_backend("tensorrt", "cpu")
    check_backend("tensorrt", "cpu", allow_fallback=True)  # eager torch will run instead
    if not torch.cuda.is_available():
        for fallback in (False, True):  # the fallback runs on the same device, so a missing one is refused
            with pytest.raises(BackendError, match="pipeline.device = cuda: no CUDA device"):
                check_backend("torch", "cuda", allow_fallback=fallback)
    with caplog.at_level(logging.WARNING, logger="linewatch.backends"):
        prepared = prepare_backend(model, "tensorrt", "cpu", x, tmp_path, "h", allow_fallback=True)
    assert prepared.backend == "torch"
    assert "falling back to eager torch" in caplog.text and "needs a CUDA device" in caplog.text


def test_engine_key_changes_with_everything_that_changes_the_engine() -> None:
    base = ("hash", "NVIDIA H100", "2.14.0", 4, (3, 256, 256))
    keys = {
        engine_key(*base),
        engine_key("other", *base[1:]),
        engine_key(base[0], "NVIDIA L4", *base[2:]),
        engine_key(*base[:2], "2.15.0", *base[3:]),
        engine_key(*base[:3], 8, base[4]),
        engine_key(*base[:4], (3, 320, 320)),
    }
    assert len(keys) == 6 and engine_key(*base) == engine_key(*base)


def test_compile_backend_matches_eager(fitted: tuple[PatchCoreModel, torch.Tensor], tmp_path: Path) -> None:
    model, x = fitted
    prepared = prepare_backend(model, "compile", "cpu", x, tmp_path, "h")  # compiles now (tens of seconds)
    with torch.inference_mode():
        out, ref = prepared(x[:1]), model(x[:1])  # a partial batch: padded, no recompile
    assert prepared.backend == "compile" and prepared.static_batch == 2
    assert torch.allclose(out.scores, ref.scores, rtol=1e-4) and torch.allclose(out.maps, ref.maps, atol=1e-3)


def test_warm_up_runs_every_batch_size_the_pipeline_can_send() -> None:
    seen: list[int] = []

    def run(x: torch.Tensor) -> ScoreResult:
        seen.append(x.shape[0])
        return ScoreResult(torch.zeros(x.shape[0]), torch.zeros(x.shape[0], 2, 2))

    PreparedModel(run, "torch").warm_up(torch.zeros(3, 3, 2, 2))
    assert seen == [1, 2, 3, 1, 2, 3]
    seen.clear()
    PreparedModel(run, "compile", static_batch=3).warm_up(torch.zeros(3, 3, 2, 2), rounds=1)
    assert seen == [3, 3, 3]  # partial batches are padded to the engine's static batch


def test_compile_backend_replays_cuda_graphs_on_a_gpu_only() -> None:
    from edge.backends import compile_options

    cpu, cuda = compile_options("cpu"), compile_options("cuda")
    assert "triton.cudagraphs" not in cpu and cuda["triton.cudagraphs"] is True
    assert cpu["emulate_precision_casts"] is True and cuda["emulate_precision_casts"] is True
    import torch._inductor.config as inductor

    for key in cuda:  # names Inductor knows: an unknown option would fail only at compile time on the box
        section, _, name = key.rpartition(".")
        assert hasattr(getattr(inductor, section) if section else inductor, name), key


class FakeTorchTensorRT(types.ModuleType):
    """torch_tensorrt's surface that `_tensorrt` uses, on the CPU: "compiling" keeps the exported program."""

    __version__ = "0.0-test"

    def __init__(self, fail: bool = False) -> None:
        super().__init__("torch_tensorrt")
        self.compiled: list[dict[str, object]] = []
        self.fail = fail
        self.last: torch.export.ExportedProgram | None = None
        self.dynamo = types.SimpleNamespace(compile=self._compile)

    def _compile(self, exported: torch.export.ExportedProgram, arg_inputs: list[torch.Tensor], **settings: object):  # noqa: ANN202
        if self.fail:
            raise RuntimeError("Unsupported operator: aten.fake\nlong trace")
        self.compiled.append(settings)
        self.last = exported
        return exported.module()

    def save(self, module: object, path: str, arg_inputs: list[torch.Tensor]) -> None:
        assert self.last is not None
        torch.export.save(self.last, path)


def test_tensorrt_engine_is_cached_by_key_and_loaded_without_recompiling(
    fitted: tuple[PatchCoreModel, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge import backends

    model, x = fitted
    gpu = {"name": "Fake GPU A"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    trt = FakeTorchTensorRT()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", trt)
    with torch.inference_mode():
        ref = model(x)
    first = backends._tensorrt(model, "cuda", x, tmp_path, "bundlehash")
    key = engine_key("bundlehash", "Fake GPU A", trt.__version__, 2, tuple(x.shape[1:]))
    assert len(trt.compiled) == 1 and trt.compiled[0] == backends.TENSORRT_SETTINGS
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.ep"]  # written whole, no temp file left
    again = backends._tensorrt(model, "cuda", x, tmp_path, "bundlehash")  # the next start
    assert len(trt.compiled) == 1  # loaded from disk
    for prepared in (first, again):
        assert prepared.backend == "tensorrt" and prepared.static_batch == 2
        with torch.inference_mode():
            out = prepared(x)
        assert torch.allclose(out.scores, ref.scores, rtol=1e-5) and torch.allclose(out.maps, ref.maps, atol=1e-4)
    gpu["name"] = "Fake GPU B"  # another GPU model: its own engine
    backends._tensorrt(model, "cuda", x, tmp_path, "bundlehash")
    assert len(trt.compiled) == 2 and len(list(tmp_path.glob("*.ep"))) == 2
    monkeypatch.setitem(sys.modules, "torch_tensorrt", FakeTorchTensorRT(fail=True))
    with pytest.raises(
        BackendError, match=r"^pipeline.backend = tensorrt: compile failed: Unsupported operator: aten.fake$"
    ):
        backends._tensorrt(model, "cuda", x, tmp_path / "other", "bundlehash")
