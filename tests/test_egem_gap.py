"""What README states about E-GEM's gap to ReLU, eps*r/(eps + r^2N), checked on the library's E-GEM:
uniform convergence (max ~ eps^(1/2N)), L^p norm on the half-line ~ eps^((1+1/p)/(2N)) when
p(2N-1) > 1, and no L^1 norm at all for N = 1 (the tail eps/r)."""

import math

import pytest
import torch

import hf_gemact


def gap(r, n, eps):
    """relu(r) - E-GEM(r) from the library, float64."""
    return torch.relu(r) - hf_gemact.gem(r, n, eps)


def lp_norm(n, eps, p, upper):
    # log-spaced grid: the gap lives at r ~ eps^(1/2N) and its tail decays as a power of r
    r = torch.logspace(-12, math.log10(upper), 400_001, dtype=torch.float64)
    g = gap(r, n, eps) ** p
    return torch.trapezoid(g, r).item() ** (1 / p)


@pytest.mark.parametrize("n", [1, 2])
def test_gap_shrinks_uniformly_as_eps_to_the_1_over_2n(n):
    r = torch.logspace(-8, 4, 200_001, dtype=torch.float64)
    peaks = [gap(r, n, eps).max().item() for eps in (1e-2, 1e-4, 1e-6)]
    for a, b in zip(peaks, peaks[1:]):  # eps / 100 -> peak / 100^(1/2N)
        assert b / a == pytest.approx(100 ** (-1 / (2 * n)), rel=1e-3)


@pytest.mark.parametrize("n,p", [(1, 2), (2, 1), (2, 2)])
def test_lp_gap_scales_when_p_2n_minus_1_exceeds_1(n, p):
    norms = [lp_norm(n, eps, p, upper=1e8) for eps in (1e-2, 1e-4)]
    assert norms[1] / norms[0] == pytest.approx(100 ** (-(1 + 1 / p) / (2 * n)), rel=2e-3)


def test_l1_gap_of_n1_is_not_integrable():
    # the integral up to R keeps growing like eps * log R: no finite L^1 norm, whatever eps
    eps = 1e-2
    parts = [lp_norm(1, eps, 1, upper=upper) for upper in (1e2, 1e4, 1e6)]
    growth = [b - a for a, b in zip(parts, parts[1:])]
    assert growth == pytest.approx([eps * math.log(100)] * 2, rel=1e-3)
