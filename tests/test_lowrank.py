import pytest
import torch

from iteris_sd.lora.lowrank import balance, dense_to_factors, truncate


def _dense_best(M: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Reference: Eckart-Young truncation of a dense matrix, and its energy."""
    P, S, Qh = torch.linalg.svd(M.double(), full_matrices=False)
    approx = (P[:, :k] * S[:k]) @ Qh[:k]
    return approx, float((S[:k] ** 2).sum() / (S**2).sum())


def test_balance_keeps_product_and_equalises_norms():
    U = torch.tensor([[100.0, 0.0, 1.0], [200.0, 0.0, 2.0]])
    Z = torch.tensor([[0.01, 0.02, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]])
    u, z = balance(U, Z)
    torch.testing.assert_close(u @ z, U @ Z)
    # component 0: ||U|| = 100 sqrt5, ||Z|| = 0.01 sqrt5 -> both sqrt(100 * 0.01) * sqrt5 = sqrt5
    torch.testing.assert_close(u.norm(dim=0)[0], torch.tensor(5.0).sqrt())
    torch.testing.assert_close(u.norm(dim=0)[:1], z.norm(dim=1)[:1])
    # components 1 and 2 have a zero side: they contribute nothing and stay zero on both sides
    assert torch.all(u[:, 1:] == 0) and torch.all(z[1:] == 0)


def test_balance_random_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(7, 4, generator=g) * torch.tensor([1e3, 1e-3, 1.0, 5.0])
    Z = torch.randn(4, 5, generator=g)
    u, z = balance(U, Z)
    assert u.dtype == torch.float32 and z.dtype == torch.float32
    torch.testing.assert_close(u @ z, U @ Z, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(u.norm(dim=0), z.norm(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("seed, d_out, d_in, R, k", [(0, 12, 9, 5, 2), (1, 6, 20, 8, 3), (2, 30, 4, 6, 1)])
def test_truncate_matches_dense_svd(seed, d_out, d_in, R, k):
    g = torch.Generator().manual_seed(seed)
    U, Z = torch.randn(d_out, R, generator=g), torch.randn(R, d_in, generator=g)
    u, z, energy = truncate(U, Z, k)
    ref, ref_energy = _dense_best(U @ Z, k)
    assert u.shape == (d_out, k) and z.shape == (k, d_in)
    assert u.dtype == torch.float32
    torch.testing.assert_close((u @ z).double(), ref, rtol=1e-4, atol=1e-4)
    assert energy == pytest.approx(ref_energy, rel=1e-6)
    assert energy < 1.0
    torch.testing.assert_close(u.norm(dim=0), z.norm(dim=1), rtol=1e-5, atol=0)


def test_truncate_rank_deficient_duplicate_columns():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 2, generator=g)
    U = torch.cat([base, base], dim=1)  # (10, 4), rank 2
    Z = torch.randn(4, 8, generator=g)
    # rank 3 > true rank 2: exact, only 2 meaningful components survive, energy 1
    u, z, energy = truncate(U, Z, 3)
    assert u.shape[1] == 2
    torch.testing.assert_close(u @ z, U @ Z, rtol=1e-4, atol=1e-4)
    assert energy == pytest.approx(1.0)
    # rank 1: same as dense truncation
    u, z, energy = truncate(U, Z, 1)
    ref, ref_energy = _dense_best(U @ Z, 1)
    torch.testing.assert_close((u @ z).double(), ref, rtol=1e-4, atol=1e-4)
    assert energy == pytest.approx(ref_energy, rel=1e-6)


def test_truncate_rank_at_least_R_returns_balanced_inputs():
    U = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    Z = torch.tensor([[1.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    u, z, energy = truncate(U, Z, 2)
    # the second component is zero (U column zero) and is removed
    assert u.shape == (2, 1) and z.shape == (1, 3)
    torch.testing.assert_close(u, torch.tensor([[2.0], [0.0]]))
    torch.testing.assert_close(z, torch.tensor([[2.0, 0.0, 0.0]]))
    assert energy == 1.0


def test_truncate_zero_matrix():
    U, Z = torch.zeros(5, 3), torch.randn(3, 4)
    for k in (1, 2, 3, 10):
        u, z, energy = truncate(U, Z, k)
        assert energy == 1.0
        assert u.shape[0] == 5 and z.shape[1] == 4 and u.shape[1] >= 1
        assert torch.all(u @ z == 0)


def test_truncate_rejects_bad_rank():
    with pytest.raises(ValueError, match="got 0"):
        truncate(torch.ones(2, 1), torch.ones(1, 2), 0)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 2\)"):
        truncate(torch.ones(2, 3), torch.ones(2, 2), 1)


def test_dense_to_factors_exact_and_truncated():
    # diag(3, 2, 0) padded: exact rank 2, energies 9/13 and 1
    M = torch.zeros(4, 3)
    M[0, 0], M[1, 1] = 3.0, -2.0
    u, z, energy = dense_to_factors(M, None)
    assert u.shape == (4, 2) and energy == pytest.approx(1.0)
    torch.testing.assert_close(u @ z, M)
    u, z, energy = dense_to_factors(M, 1)
    expected = torch.zeros(4, 3)
    expected[0, 0] = 3.0
    torch.testing.assert_close(u @ z, expected)
    assert energy == pytest.approx(9.0 / 13.0)
    torch.testing.assert_close(u.norm(dim=0), z.norm(dim=1))


def test_dense_to_factors_random_and_zero():
    g = torch.Generator().manual_seed(4)
    M = torch.randn(9, 7, generator=g)
    u, z, energy = dense_to_factors(M, 3)
    ref, ref_energy = _dense_best(M, 3)
    torch.testing.assert_close((u @ z).double(), ref, rtol=1e-4, atol=1e-5)
    assert energy == pytest.approx(ref_energy, rel=1e-6)
    u, z, energy = dense_to_factors(torch.zeros(3, 2), None)
    assert u.shape == (3, 1) and energy == 1.0 and torch.all(u @ z == 0)


def test_dense_to_factors_validation():
    with pytest.raises(ValueError, match="got -1"):
        dense_to_factors(torch.ones(2, 2), -1)
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        dense_to_factors(torch.ones(2, 2, 2), 1)
