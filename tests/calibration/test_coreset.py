import pytest
import torch

from calibration import coreset
from calibration.coreset import coverage_radius, k_center_greedy, random_projection


def _reference_k_center(x: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """Textbook greedy k-center in float64, no projection."""
    x = x.double()
    selected = [start]
    d = ((x - x[start]) ** 2).sum(1)
    for _ in range(n - 1):
        i = int(d.argmax())
        selected.append(i)
        d = torch.minimum(d, ((x - x[i]) ** 2).sum(1))
    return torch.tensor(selected)


def test_one_dimensional_farthest_first() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    sel = k_center_greedy(x, 3, projection_dim=0, seed=0)
    assert len(set(sel.tolist())) == 3
    # Whatever the start, the three picks cover both clusters and the coverage radius is at most 1.
    assert coverage_radius(x, sel) <= 1.0


def test_same_coverage_as_reference_algorithm() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 64, generator=g) * 5
    x = (centres[torch.randint(20, (3000,), generator=g)] + torch.randn(3000, 64, generator=g)).float()
    sel = k_center_greedy(x, 300, projection_dim=0, seed=3)
    ref = _reference_k_center(x, 300, int(sel[0]))
    ours, theirs = coverage_radius(x, sel), coverage_radius(x, ref)
    assert len(set(sel.tolist())) == 300
    assert ours <= theirs * 1.05
    # With the JL projection the coverage stays equivalent.
    projected = coverage_radius(x, k_center_greedy(x, 300, projection_dim=32, seed=3))
    assert projected <= theirs * 1.15


def test_beats_random_subset() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(2000, 16, generator=g), torch.randn(20, 16, generator=g) + 30])
    sel = k_center_greedy(x, 50, projection_dim=0, seed=0)
    rand = torch.randperm(x.shape[0], generator=g)[:50]
    assert coverage_radius(x, sel) < coverage_radius(x, rand)
    assert (sel >= 2000).any()  # the far cluster is always represented


def test_lazy_blocks_pick_exactly_what_the_textbook_loop_picks() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 24, generator=g) * torch.rand(1000, 1, generator=g) * 4  # uneven density, no ties
    for block, refresh in ((64, 1), (100, 3), (1000, 2), (4096, 1)):  # 1000 % 64 != 0: padded last block
        sel = k_center_greedy(x, 120, projection_dim=0, seed=7, block=block, refresh=refresh)
        assert torch.equal(sel, _reference_k_center(x, 120, int(sel[0]))), (block, refresh)


def test_projected_selection_in_chunks_picks_what_the_textbook_loop_picks_on_the_projection(monkeypatch) -> None:
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(1500, 48, generator=g) * torch.rand(1500, 1, generator=g) * 4).half()  # a float16 bank
    monkeypatch.setattr(coreset, "_PROJECT_ROWS", 128)  # several projection chunks, the last one partial
    sel = k_center_greedy(x, 100, projection_dim=16, seed=2, block=64)
    projected = random_projection(x.float(), 16, torch.Generator().manual_seed(2))
    assert torch.equal(sel, _reference_k_center(projected, 100, int(sel[0])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU box)")
def test_selection_on_cuda_picks_what_the_cpu_picks() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 96, generator=g) * torch.rand(3000, 1, generator=g) * 4
    cpu = k_center_greedy(x, 200, projection_dim=32, seed=7)
    gpu = k_center_greedy(x.cuda(), 200, projection_dim=32, seed=7)
    assert gpu.device.type == "cpu"  # indices come back where the caller indexes with them
    assert torch.equal(gpu, cpu)


def test_queued_loop_for_gpus_picks_what_the_textbook_loop_picks() -> None:
    from calibration.coreset import farthest_first_queued

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 24, generator=g) * torch.rand(1000, 1, generator=g) * 4  # uneven density, no ties
    sel = farthest_first_queued(x, 120, start=17)  # the same code a GPU runs, here on the CPU
    assert torch.equal(sel, _reference_k_center(x, 120, 17))
