"""Distilling a teacher on the corpus: resumable to the same weights (with any number of image workers), a
file that EfficientAD loads, settings checked."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from calibration.teacher_distillation import DistillationSettings, distil
from edge.models.efficientad import TEACHER_CHANNELS, PatchDescriptionNetwork, load_pdn_weights

TINY = DistillationSettings(side=64, steps=6, batch_size=2, statistics_images=4, held_out_images=4)


def test_a_resumed_distillation_ends_with_the_teacher_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = distil(TINY, tmp_path / "whole.pt", eval_every=3)
    checkpoint = tmp_path / "run.ckpt"
    part = distil(TINY, tmp_path / "part.pt", checkpoint, checkpoint_every=2, eval_every=3, stop_after=4)
    assert part.step == 4 and checkpoint.is_file()
    rest = distil(TINY, tmp_path / "part.pt", checkpoint, checkpoint_every=2, eval_every=3, workers=2)
    assert rest.step == 6
    expected = whole.teacher.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in rest.teacher.state_dict().items())
    assert [s for s, _ in rest.held_out_loss] == [0, 3, 6]
    assert rest.held_out_loss == whole.held_out_loss


def test_the_teacher_file_loads_into_a_pdn_and_says_how_it_was_made(tmp_path: Path) -> None:
    d = distil(TINY, tmp_path / "t.pt", eval_every=3)
    pdn = PatchDescriptionNetwork("small", TEACHER_CHANNELS, padding=False)
    load_pdn_weights(pdn, tmp_path / "t.pt")
    assert all(torch.equal(v, d.teacher.state_dict()[k].cpu()) for k, v in pdn.state_dict().items())
    record = torch.load(tmp_path / "t.pt", weights_only=True)["record"]
    assert record["steps_done"] == 6 and record["settings"]["side"] == 64
    assert record["held_out_loss"][0][0] == 0 and record["corpus"]["procedural"]
    with pytest.raises(ValueError, match="do not fit a PDN-M"):
        load_pdn_weights(PatchDescriptionNetwork("medium", TEACHER_CHANNELS, padding=False), tmp_path / "t.pt")


def test_a_checkpoint_of_other_settings_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    distil(TINY, tmp_path / "t.pt", checkpoint, stop_after=1)
    with pytest.raises(ValueError, match=r"run\.ckpt: written by a distillation with other batch_size, learning_rate"):
        distil(replace(TINY, learning_rate=0.01, batch_size=3), tmp_path / "t.pt", checkpoint)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.ckpt: not a teacher distillation checkpoint"):
        distil(TINY, tmp_path / "t.pt", tmp_path / "junk.ckpt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": "large"}, "size 'large': expected one of small, medium"),
        ({"side": 100}, "side = 100: expected a multiple"),
    ],
)
def test_bad_settings_are_named(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)
