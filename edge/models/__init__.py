"""Model registry: name -> scoring module class (each with `params`, `tensors`, `from_tensors`)."""

from __future__ import annotations

from edge.models.efficientad import EfficientADModel
from edge.models.padim import PadimModel
from edge.models.patchcore import PatchCoreModel

AnomalyModel = PatchCoreModel | PadimModel | EfficientADModel
ModelClass = type[PatchCoreModel] | type[PadimModel] | type[EfficientADModel]

MODELS: dict[str, ModelClass] = {
    PatchCoreModel.name: PatchCoreModel,
    PadimModel.name: PadimModel,
    EfficientADModel.name: EfficientADModel,
}


def get_model_class(name: str) -> ModelClass:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(sorted(MODELS))}")
    return MODELS[name]
