import pytest
import torch

from edge.scoring import (
    BFLOAT16_SEARCH_ROWS,
    AnomalyMapSmoother,
    bank_columns,
    bfloat16_bank_operand,
    bfloat16_query_operand,
    bfloat16_sq_distance,
    gaussian_kernel1d,
    k_nearest,
    nearest_neighbor,
    squared_norms,
)


def test_nearest_neighbor_matches_brute_force_for_any_chunk_size() -> None:
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    ref = torch.cdist(q, bank)
    ref_d, ref_i = ref.min(dim=1)
    for chunk in (1, 37 * 5, 37 * 101, 1 << 24):
        d, i = nearest_neighbor(q, bank_columns(bank), squared_norms(bank), chunk_elements=chunk)
        assert torch.equal(i, ref_i)
        assert torch.allclose(d, ref_d, atol=1e-4)


def test_k_nearest_matches_topk_across_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(5, 8, generator=g), torch.randn(50, 8, generator=g)
    ref = torch.cdist(q, bank).topk(4, dim=1, largest=False).indices
    for chunk in (5, 5 * 7, 1 << 24):
        assert torch.equal(k_nearest(q, bank_columns(bank), squared_norms(bank), 4, chunk), ref)


def test_smoother_keeps_constant_maps_and_spreads_a_peak() -> None:
    smoother = AnomalyMapSmoother((64, 64), sigma=4.0)
    flat = smoother(torch.full((2, 8, 8), 3.0))
    assert flat.shape == (2, 64, 64) and torch.allclose(flat, torch.tensor(3.0))
    peak = torch.zeros(1, 8, 8)
    peak[0, 4, 4] = 1.0
    out = smoother(peak)
    assert out.max() < 1.0 and abs(float(out.sum()) - 64.0) < 1.0  # mass conserved (x 8^2 upsampling)
    assert int(out[0].argmax()) // 64 in range(30, 40)


@pytest.mark.parametrize(
    ("grid", "size", "sigma", "border", "upsampling"),
    [
        ((8, 8), (64, 64), 4.0, 0, "linear"),
        ((6, 9), (40, 72), 2.0, 2, "linear"),
        ((8, 8), (64, 64), 0.0, 1, "linear"),
        ((8, 8), (64, 64), 4.0, 0, "cubic"),
        ((6, 9), (40, 72), 2.0, 2, "cubic"),
    ],
)
def test_smoother_operators_equal_upsampling_then_blurring_the_map(
    grid: tuple[int, int], size: tuple[int, int], sigma: float, border: int, upsampling: str
) -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, *grid, generator=g) * 30
    x = torch.nn.functional.pad(scores.unsqueeze(1), (border,) * 4, mode="replicate")
    mode = {"linear": "bilinear", "cubic": "bicubic"}[upsampling]
    x = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False)
    if sigma > 0:  # the 2-D computation the operators stand for
        k = gaussian_kernel1d(sigma)
        r = k.numel() // 2
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    got = AnomalyMapSmoother(size, sigma, border=border, upsampling=upsampling)(scores)
    assert got.shape == (2, *size)
    assert torch.allclose(got, x.squeeze(1), rtol=1e-5, atol=1e-5)


def _spread_px2(smoother: AnomalyMapSmoother) -> float:
    """Variance (in output pixels squared) of the map of one high cell in the middle of an 8 x 8 grid."""
    peak = torch.zeros(1, 8, 8)
    peak[0, 4, 4] = 1.0
    rows = smoother(peak)[0].sum(dim=1)
    rows = rows / rows.sum()
    x = torch.arange(rows.numel(), dtype=torch.float32)
    return float((rows * (x - (rows * x).sum()) ** 2).sum())


def test_cubic_upsampling_adds_no_blur_of_its_own_where_linear_adds_a_third_of_a_cell() -> None:
    # At 8 output pixels per cell, linear interpolation spreads a cell with variance 8^2 / 6 on top of
    # the Gaussian's; bicubic's kernel has negative lobes and leaves the map at most as spread as sigma.
    linear = _spread_px2(AnomalyMapSmoother((64, 64), 4.0, upsampling="linear"))
    cubic = _spread_px2(AnomalyMapSmoother((64, 64), 4.0, upsampling="cubic"))
    assert linear == pytest.approx(16.0 + 64 / 6, abs=0.3)
    assert 10.0 < cubic <= 16.0
    flat = AnomalyMapSmoother((64, 64), 4.0, upsampling="cubic")(torch.full((1, 8, 8), 2.5))
    assert torch.allclose(flat, torch.tensor(2.5), atol=1e-5)  # both still keep a constant map


def test_an_unknown_upsampling_is_refused() -> None:
    with pytest.raises(ValueError, match="map upsampling 'nearest': expected one of linear, cubic"):
        AnomalyMapSmoother((64, 64), 4.0, upsampling="nearest")


def test_bfloat16_minimum_is_exact_over_distances_of_either_sign() -> None:
    # The CPU takes the minimum of the bf16 products through their int16 bits: check it against the
    # float minimum, with negative products (rounding near a zero distance) in some rows and not others.
    g = torch.Generator().manual_seed(4)
    bank = torch.rand(3 * BFLOAT16_SEARCH_ROWS + 7, 8, generator=g).bfloat16()
    q = torch.cat([torch.rand(20, 8, generator=g), -torch.rand(20, 8, generator=g), torch.randn(24, 8, generator=g)])
    q = q.bfloat16()  # products: all positive, all negative, mixed
    expected = (q @ bank.t()).float().amin(dim=1).clamp_min(0)
    assert bool((expected[:20] > 0).all()) and bool((expected[20:40] == 0).all())
    for chunk in (64 * 7, 1 << 24):  # blocks set by the memory bound, and by BFLOAT16_SEARCH_ROWS
        assert torch.equal(bfloat16_sq_distance(q, bank, chunk), expected)


def test_bfloat16_search_gives_the_distance_between_rounded_points() -> None:
    g = torch.Generator().manual_seed(2)
    # Patch-feature-like data: non-negative, norms far larger than the nearest-neighbour distances.
    bank = torch.rand(2000, 64, generator=g) * 3
    q = bank[torch.randint(0, 2000, (300,), generator=g)] + 0.05 * torch.randn(300, 64, generator=g)
    ref = torch.stack([(q - b).pow(2).sum(dim=1) for b in bank]).min(dim=0).values.sqrt()  # direct, no matmul
    centre = bank.mean(dim=0)
    bank_op = bfloat16_bank_operand(bank, centre)
    query_op = bfloat16_query_operand(q, centre)
    assert bank_op.dtype == query_op.dtype == torch.bfloat16 and bank_op.shape == (2000, 64 + 4)
    # What it computes: the nearest distance between the centred points rounded to bf16, in float64.
    rounded = torch.cdist((q - centre).bfloat16().double(), (bank - centre).bfloat16().double()).amin(dim=1)
    # Rounding moves each centred point by at most 2^-9 of its norm, so each distance by at most this:
    moved = 2.0**-9 * ((q - centre).norm(dim=1) + (bank - centre).norm(dim=1).max())
    for chunk in (300 * 128, 1 << 24):  # blocks set by the memory bound, and by BFLOAT16_SEARCH_ROWS
        d = bfloat16_sq_distance(query_op, bank_op, chunk).sqrt()
        # The output is rounded to bf16 and the norms cancel in the fp32 accumulator: a few 1e-3.
        assert float(((d.double() - rounded).abs() / rounded).max()) < 5e-3
        assert bool(((d - ref).abs() <= moved + 5e-3 * ref).all())
    # One plain bf16 matmul (|b|^2 - 2 q.b) is off by far more on the same data.
    plain = (squared_norms(bank).bfloat16() - 2 * q.bfloat16() @ bank.bfloat16().t()).amin(dim=1).float()
    plain_d = (plain + squared_norms(q)).clamp_min(0).sqrt()
    assert float(((plain_d - ref).abs() / ref).max()) > 0.05


def test_smoother_built_for_a_grid_size_gives_the_same_maps_and_still_takes_other_grids() -> None:
    g = torch.Generator().manual_seed(3)
    built = AnomalyMapSmoother((64, 48), sigma=2.0, grid_size=(8, 6))
    per_call = AnomalyMapSmoother((64, 48), sigma=2.0)
    for shape in ((2, 8, 6), (1, 16, 12)):  # the size it was built for, and another one
        scores = torch.rand(*shape, generator=g)
        assert torch.allclose(built(scores), per_call(scores), atol=1e-6)
    assert built.grid_rows.shape == (64, 8) and built.grid_cols.shape == (48, 6)
