import torch

from edge.scoring import AnomalyMapSmoother, k_nearest, nearest_neighbor, nearest_neighbor_reranked, squared_norms


def test_nearest_neighbor_matches_brute_force_for_any_chunk_size() -> None:
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    ref = torch.cdist(q, bank)
    ref_d, ref_i = ref.min(dim=1)
    for chunk in (1, 37 * 5, 37 * 101, 1 << 24):
        d, i = nearest_neighbor(q, bank, squared_norms(bank), chunk_elements=chunk)
        assert torch.equal(i, ref_i)
        assert torch.allclose(d, ref_d, atol=1e-4)


def test_k_nearest_matches_topk_across_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(5, 8, generator=g), torch.randn(50, 8, generator=g)
    ref = torch.cdist(q, bank).topk(4, dim=1, largest=False).indices
    for chunk in (5, 5 * 7, 1 << 24):
        assert torch.equal(k_nearest(q, bank, squared_norms(bank), 4, chunk), ref)


def test_smoother_keeps_constant_maps_and_spreads_a_peak() -> None:
    smoother = AnomalyMapSmoother((64, 64), sigma=4.0)
    flat = smoother(torch.full((2, 8, 8), 3.0))
    assert flat.shape == (2, 64, 64) and torch.allclose(flat, torch.tensor(3.0))
    peak = torch.zeros(1, 8, 8)
    peak[0, 4, 4] = 1.0
    out = smoother(peak)
    assert out.max() < 1.0 and abs(float(out.sum()) - 64.0) < 1.0  # mass conserved (x 8^2 upsampling)
    assert int(out[0].argmax()) // 64 in range(30, 40)


def test_reranked_bfloat16_search_finds_the_exact_nearest_neighbour() -> None:
    g = torch.Generator().manual_seed(2)
    # Patch-feature-like data: non-negative, many near-ties (bf16 alone would mis-rank some of them).
    bank = torch.rand(2000, 64, generator=g) * 3
    q = bank[torch.randint(0, 2000, (300,), generator=g)] + 0.05 * torch.randn(300, 64, generator=g)
    ref_i = torch.cdist(q, bank).min(dim=1).indices
    ref_d = (q - bank[ref_i]).norm(dim=1)  # direct: cdist's matmul form has ~1e-4 cancellation error here
    low = bank.bfloat16()
    for chunk in (300 * 128, 1 << 24):
        d, i = nearest_neighbor_reranked(q, bank, low, squared_norms(bank).bfloat16(), 4, chunk)
        assert torch.equal(i, ref_i)
        assert torch.allclose(d, ref_d, atol=1e-6)
    # The distance is exact float32 even where bf16 rounding alone would be off by far more.
    approx = (q.bfloat16().float().unsqueeze(1) - low.float()[ref_i].unsqueeze(1)).norm(dim=2).squeeze(1)
    assert (approx - ref_d).abs().max() > 1e-3
