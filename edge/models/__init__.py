"""Model registry: name -> scoring module class (each with `params`, `tensors`, `from_tensors`)."""

from __future__ import annotations

from edge.models.padim import PadimModel
from edge.models.patchcore import PatchCoreModel

AnomalyModel = PatchCoreModel | PadimModel

MODELS: dict[str, type[PatchCoreModel] | type[PadimModel]] = {
    PatchCoreModel.name: PatchCoreModel,
    PadimModel.name: PadimModel,
}


def get_model_class(name: str) -> type[PatchCoreModel] | type[PadimModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(sorted(MODELS))}")
    return MODELS[name]
