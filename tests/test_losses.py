"""rotstn.losses against references nobody here wrote: numpy's complex angle,
scipy.stats.vonmises, torch's cross-entropy; periodicity, shapes, gradcheck."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats
from torch.autograd import gradcheck

from rotstn import losses

SHAPES = [(7,), (3, 5)]


def _angles(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=dtype) * 4 - 2) * math.pi


class TestAngularError:
    @pytest.mark.parametrize("shape", SHAPES)
    def test_matches_numpy_complex_angle(self, shape):
        a, b = _angles(shape, 0), _angles(shape, 1)
        ref = np.abs(np.angle(np.exp(1j * (a.numpy() - b.numpy()))))
        out = losses.angular_error(a, b)
        assert out.shape == shape
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)

    def test_seam_and_degrees(self):
        a = torch.deg2rad(torch.tensor([359.0, 0.0, 180.0], dtype=torch.float64))
        b = torch.deg2rad(torch.tensor([1.0, 360.0, -180.0], dtype=torch.float64))
        torch.testing.assert_close(
            losses.angular_error(a, b, degrees=True), torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
        )

    def test_period_for_symmetric_objects(self):
        # An object with 2-fold symmetry: 179° and -1° are the same pose.
        a = torch.deg2rad(torch.tensor([179.0], dtype=torch.float64))
        b = torch.deg2rad(torch.tensor([-1.0], dtype=torch.float64))
        err = losses.angular_error(a, b, period=math.pi, degrees=True)
        torch.testing.assert_close(err, torch.tensor([0.0], dtype=torch.float64))

    def test_reductions(self):
        a, b = _angles((4, 3), 0), _angles((4, 3), 1)
        e = losses.angular_error(a, b)
        torch.testing.assert_close(losses.angular_error(a, b, reduction="mean"), e.mean())
        torch.testing.assert_close(losses.angular_error(a, b, reduction="sum"), e.sum())

    def test_errors(self):
        with pytest.raises(ValueError, match="same shape"):
            losses.angular_error(torch.zeros(3), torch.zeros(4))
        with pytest.raises(ValueError, match="reduction must be one of"):
            losses.angular_error(torch.zeros(3), torch.zeros(3), reduction="avg")
        with pytest.raises(TypeError, match=r"pred must be a torch\.Tensor"):
            losses.angular_error([0.0], torch.zeros(1))
        with pytest.raises(ValueError, match="period must be positive"):
            losses.angular_error(torch.zeros(1), torch.zeros(1), period=0.0)


PERIODIC = [
    ("cosine", lambda p, t: losses.cosine_loss(p, t, reduction="none")),
    ("von_mises", lambda p, t: losses.von_mises_loss(p, t, kappa=2.0, reduction="none")),
    ("angular_error", lambda p, t: losses.angular_error(p, t)),
]


@pytest.mark.parametrize("name, fn", PERIODIC, ids=[n for n, _ in PERIODIC])
@pytest.mark.parametrize("shape", SHAPES)
class TestDistanceLosses:
    def test_zero_at_match_and_periodic(self, name, fn, shape):
        t = _angles(shape, 2)
        k = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(3)).double()
        torch.testing.assert_close(fn(t + 2 * math.pi * k, t), torch.zeros(shape, dtype=torch.float64))
        p = _angles(shape, 4)
        torch.testing.assert_close(fn(p + 2 * math.pi * k, t - 2 * math.pi), fn(p, t))
        assert (fn(p, t) > 0).all()

    def test_symmetric_in_the_difference(self, name, fn, shape):
        p, t = _angles(shape, 5), _angles(shape, 6)
        torch.testing.assert_close(fn(p, t), fn(t, p))


class TestCosineAndVonMises:
    def test_cosine_values(self):
        p = torch.tensor([0.0, math.pi / 2, math.pi], dtype=torch.float64)
        out = losses.cosine_loss(p, torch.zeros(3, dtype=torch.float64), reduction="none")
        torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))

    def test_von_mises_small_kappa_is_kappa_times_cosine(self):
        p, t = _angles((50,), 1), _angles((50,), 2)
        vm = losses.von_mises_loss(p, t, kappa=1e-4, reduction="none")
        torch.testing.assert_close(
            vm / 1e-4, losses.cosine_loss(p, t, reduction="none"), rtol=1e-3, atol=1e-6
        )

    def test_von_mises_on_vectors_equals_on_angles(self):
        p, t = _angles((3, 4), 1), _angles((3, 4), 2)
        vec = torch.stack((torch.cos(p), torch.sin(p)), -1) * 3.0  # length does not matter
        torch.testing.assert_close(losses.von_mises_loss(vec, t), losses.von_mises_loss(p, t))

    def test_von_mises_bad_vector_shape(self):
        with pytest.raises(ValueError, match=r"pred must have shape \(\*target.shape, 2\)"):
            losses.von_mises_loss(torch.zeros(4, 3), torch.zeros(4))

    def test_gradcheck(self):
        p = _angles((3, 2), 1).requires_grad_()
        t = _angles((3, 2), 2)
        assert gradcheck(lambda x: losses.cosine_loss(x, t, reduction="none"), (p,))
        assert gradcheck(lambda x: losses.von_mises_loss(x, t, kappa=3.0, reduction="none"), (p,))
        v = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
        assert gradcheck(lambda x: losses.von_mises_loss(x, t, kappa=3.0, reduction="none"), (v,))


class TestVonMisesNLL:
    @pytest.mark.parametrize("shape", SHAPES)
    def test_matches_scipy(self, shape):
        mu, t = _angles(shape, 1), _angles(shape, 2)
        kappa = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 50 + 0.01
        out = losses.von_mises_nll(mu, kappa, t, reduction="none")
        ref = -stats.vonmises.logpdf(t.numpy(), kappa.numpy(), loc=mu.numpy())
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)

    def test_finite_for_huge_kappa_in_float32(self):
        # I0(κ) overflows float32 above κ ≈ 88; the NLL must not.
        kappa = torch.tensor([1e2, 1e4, 1e6])
        t = torch.tensor([0.0, 0.01, 0.001])
        out = losses.von_mises_nll(torch.zeros(3), kappa, t, reduction="none")
        ref = -stats.vonmises.logpdf(t.double().numpy(), kappa.double().numpy())
        assert torch.isfinite(out).all()
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)

    def test_periodic_and_smallest_at_match(self):
        t = _angles((20,), 1)
        kappa = torch.full((20,), 4.0, dtype=torch.float64)
        at = losses.von_mises_nll(t + 2 * math.pi, kappa, t, reduction="none")
        off = losses.von_mises_nll(t + 0.3, kappa, t, reduction="none")
        torch.testing.assert_close(at, losses.von_mises_nll(t, kappa, t, reduction="none"))
        assert (off > at).all()

    def test_gradcheck_mean_and_kappa(self):
        mu = _angles((4,), 1).requires_grad_()
        kappa = (torch.rand(4, dtype=torch.float64) * 5 + 0.5).requires_grad_()
        t = _angles((4,), 2)
        assert gradcheck(lambda m, k: losses.von_mises_nll(m, k, t, reduction="none"), (mu, kappa))

    def test_shape_errors(self):
        with pytest.raises(ValueError, match="kappa and target must have the same shape"):
            losses.von_mises_nll(torch.zeros(3), torch.ones(2), torch.zeros(3))


class TestUnitNorm:
    def test_values_and_gradcheck(self):
        v = torch.tensor([[3.0, 4.0], [0.6, 0.8]], dtype=torch.float64)
        torch.testing.assert_close(
            losses.unit_norm_penalty(v, reduction="none"), torch.tensor([16.0, 0.0], dtype=torch.float64)
        )
        x = (torch.randn(3, 5, 2, dtype=torch.float64) + 2).requires_grad_()
        assert gradcheck(lambda a: losses.unit_norm_penalty(a, reduction="none"), (x,))

    def test_error(self):
        with pytest.raises(ValueError, match=r"vec must have shape \(\.\.\., 2\)"):
            losses.unit_norm_penalty(torch.zeros(4, 3))


class TestSoftLabels:
    def test_von_mises_window_matches_scipy(self):
        t = torch.tensor([0.3, -2.9, 3.1], dtype=torch.float64)
        bins, width = 32, 1.5
        out = losses.circular_soft_labels(t, bins, width=width)
        kappa = 1 / (width * 2 * math.pi / bins) ** 2
        centres = np.arange(bins) * 2 * np.pi / bins
        ref = stats.vonmises.pdf(centres[None], kappa, loc=t.numpy()[:, None])
        ref /= ref.sum(-1, keepdims=True)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-12)

    def test_gaussian_window_wraps(self):
        # A target just below 2π is one bin from bin 0 and two from bin K-2.
        bins = 16
        t = torch.tensor([2 * math.pi - 1e-9], dtype=torch.float64)
        p = losses.circular_soft_labels(t, bins, width=1.0, window="gaussian")[0]
        torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert p.argmax() == 0
        torch.testing.assert_close(p[1], p[-1])
        expected_ratio = math.exp(-0.5 * 1.0) / math.exp(0.0)
        torch.testing.assert_close(p[1] / p[0], torch.tensor(expected_ratio, dtype=torch.float64))

    def test_one_hot_and_shapes(self):
        t = torch.deg2rad(torch.tensor([[0.0, 90.0, 359.0]]))
        out = losses.circular_soft_labels(t, 4, width=0.0)
        assert out.shape == (1, 3, 4)
        assert out.argmax(-1).tolist() == [[0, 1, 0]]

    def test_errors(self):
        with pytest.raises(ValueError, match="window must be one of"):
            losses.circular_soft_labels(torch.zeros(1), 8, window="box")
        with pytest.raises(ValueError, match="bins must be an int >= 2"):
            losses.circular_soft_labels(torch.zeros(1), 1)
        with pytest.raises(ValueError, match="width must be >= 0"):
            losses.circular_soft_labels(torch.zeros(1), 8, width=-1.0)


class TestSoftCrossEntropy:
    @pytest.mark.parametrize("shape", SHAPES)
    def test_equals_torch_cross_entropy_minus_entropy(self, shape):
        bins = 24
        logits = torch.randn(*shape, bins, dtype=torch.float64)
        t = _angles(shape, 1)
        labels = losses.circular_soft_labels(t, bins)
        ce = F.cross_entropy(logits.reshape(-1, bins), labels.reshape(-1, bins), reduction="none")
        entropy = special.entr(labels.numpy()).sum(-1).reshape(-1)
        out = losses.circular_soft_cross_entropy(logits, t, reduction="none")
        assert out.shape == shape
        np.testing.assert_allclose(out.reshape(-1).numpy(), ce.numpy() - entropy, rtol=1e-10, atol=1e-12)

    def test_zero_at_match_and_periodic(self):
        t = _angles((5, 3), 1)
        logits = losses.circular_soft_labels(t, 32).log()
        torch.testing.assert_close(
            losses.circular_soft_cross_entropy(logits, t + 2 * math.pi, reduction="none"),
            torch.zeros(5, 3, dtype=torch.float64),
            atol=1e-9,
            rtol=0,
        )

    def test_near_bin_costs_less_than_far_bin(self):
        logits = losses.circular_soft_labels(torch.tensor([0.0], dtype=torch.float64), 64).log()
        near = losses.circular_soft_cross_entropy(logits, torch.tensor([0.2], dtype=torch.float64))
        far = losses.circular_soft_cross_entropy(logits, torch.tensor([3.0], dtype=torch.float64))
        assert 0 < near < far

    def test_gradcheck(self):
        logits = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
        t = _angles((3,), 2)
        assert gradcheck(lambda x: losses.circular_soft_cross_entropy(x, t, reduction="none"), (logits,))

    def test_shape_error(self):
        with pytest.raises(ValueError, match=r"logits must have shape \(\*target.shape, K\)"):
            losses.circular_soft_cross_entropy(torch.zeros(3, 8), torch.zeros(4))


class TestCredibleArcs:
    @pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
    def test_von_mises_arc_matches_scipy_interval(self, level):
        kappa = torch.tensor([0.0, 0.3, 1.0, 4.0, 30.0, 900.0], dtype=torch.float64)
        h = losses.von_mises_credible_arc(kappa, level)
        # scipy's central interval; at κ = 0 (uniform) it is level · π on each side.
        ref = [level * math.pi if k == 0 else stats.vonmises.interval(level, k)[1] for k in kappa.tolist()]
        np.testing.assert_allclose(h.numpy(), ref, rtol=1e-3, atol=1e-3)

    @pytest.mark.parametrize("level", [0.5, 0.9])
    def test_binned_arc_matches_brute_force(self, level):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(5, 16, generator=g, dtype=torch.float64) * 2
        center = _angles((5,), 3)
        h = losses.binned_credible_arc(logits, center, level).numpy()
        # Brute force: the mass of a fine grid of angles on the arc, each carrying its bin's density.
        p = torch.softmax(logits, -1).numpy()
        fine = np.linspace(-math.pi, math.pi, 200001)[:-1]
        step = fine[1] - fine[0]
        for i in range(5):
            bins = (
                np.round(np.mod(center[i].item() + fine, 2 * math.pi) / (2 * math.pi / 16)).astype(int) % 16
            )
            density = p[i][bins] / (2 * math.pi / 16)
            inside = np.abs(fine) <= h[i]
            assert abs(density[inside].sum() * step - level) < 1e-3
            narrower = np.abs(fine) <= h[i] - 0.01
            assert density[narrower].sum() * step < level

    def test_binned_nll_matches_numpy(self):
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(6, 8, generator=g, dtype=torch.float64)
        t = _angles((6,), 4)
        width = 2 * math.pi / 8
        k = np.round(np.mod(t.numpy(), 2 * math.pi) / width).astype(int) % 8
        p = torch.softmax(logits, -1).numpy()
        ref = -np.log(p[np.arange(6), k] / width)
        out = losses.binned_nll(logits, t, reduction="none")
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
        assert torch.isclose(
            losses.binned_nll(torch.zeros(1, 8), torch.tensor([0.3])), torch.tensor(math.log(2 * math.pi))
        )

    def test_in_arc_wraps(self):
        c, h = torch.tensor([3.0, -3.0, 0.0]), torch.tensor([0.5, 0.5, 1.0])
        t = torch.tensor([-2.9, 2.9, 2 * math.pi + 0.05])
        assert losses.in_arc(c, h, t).tolist() == [True, True, True]
        assert losses.in_arc(c, h * 0.1, t).tolist() == [False, False, True]

    def test_errors(self):
        with pytest.raises(ValueError, match="level must be a probability in"):
            losses.von_mises_credible_arc(torch.ones(2), 1.0)
        with pytest.raises(ValueError, match="kappa must be >= 0"):
            losses.von_mises_credible_arc(-torch.ones(2), 0.5)
        with pytest.raises(ValueError, match=r"logits must have shape \(\*center.shape, K\)"):
            losses.binned_credible_arc(torch.zeros(2, 8), torch.zeros(3), 0.5)
