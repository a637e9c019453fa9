import pytest
import torch

import edge.precision as precision
from edge.precision import bfloat16_on, resolve_precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_and_explicit_values_do_not(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "native_bfloat16_matmul", lambda: native)
    assert resolve_precision("auto", "x") == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", "x") == "float32"
    assert resolve_precision("bfloat16", "x") == "bfloat16"


def test_unknown_precision_names_the_field() -> None:
    with pytest.raises(ValueError, match="backbone_precision must be one of float32, bfloat16, auto, got 'float16'"):
        resolve_precision("float16", "backbone_precision")


def test_auto_means_bfloat16_only_on_the_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bfloat16_on("auto", "bfloat16", cpu) and not bfloat16_on("auto", "bfloat16", cuda)
    assert bfloat16_on("bfloat16", "bfloat16", cpu) and bfloat16_on("bfloat16", "bfloat16", cuda)
    assert not bfloat16_on("auto", "float32", cpu) and not bfloat16_on("float32", "float32", cpu)


def test_efficientad_training_precision_resolves_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from calibration.efficientad import resolve_train_precision

    monkeypatch.setattr(precision, "native_bfloat16_matmul", lambda: True)
    assert resolve_train_precision("auto", "cpu") == "bfloat16"
    assert resolve_train_precision("auto", "cuda") == "float32"
    assert resolve_train_precision("bfloat16", "cuda") == "bfloat16"
    monkeypatch.setattr(precision, "native_bfloat16_matmul", lambda: False)
    assert resolve_train_precision("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="model.efficientad.precision must be one of"):
        resolve_train_precision("fp8", "cpu")
