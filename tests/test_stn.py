"""RotationSTN and its encoders: shapes for any input size, the identity start,
gradients to every encoder parameter, refinement that resamples the original
once, the sign convention against scipy.ndimage.rotate, and training runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import interior, real_image
from scipy import ndimage
from torch.autograd import gradcheck

import rotstn
from rotstn import encoders, heads


def _disk(h, w):
    # Rotation moves the corners out of the frame; compare what stays inside the inscribed disk.
    return torch.from_numpy(interior(h, w, margin=1.0)).float()


def _crops(n, size=24, seed=0):
    return torch.cat([real_image(size, size, seed + i).float() for i in range(n)]) * _disk(size, size)


# Each test builds its own modules: a shared encoder instance would carry what one test's optimizer
# steps did into the next (it did: the concat encoder's first layer, trained by earlier tests, once
# passed no gradient on, depending on which tests had run before).
CONFIGS = [
    lambda: dict(paired=True),
    lambda: dict(paired=False),
    lambda: dict(paired=True, head="unit_vector"),
    lambda: dict(paired=False, head="von_mises"),
    lambda: dict(paired=True, head="binned", encoder=encoders.ConcatEncoder(3, width=4, out_features=8)),
]
IDS = ["paired-default", "single-default", "paired-unit_vector", "single-von_mises", "paired-concat-binned"]


@pytest.fixture
def cfg(request):
    return request.param()


def _call(stn, x, y):
    return stn(x, y) if stn.paired else stn(x)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS, indirect=True)
class TestRotationSTN:
    @pytest.mark.parametrize("size", [(28, 28), (21, 34)])
    def test_shapes_any_size(self, cfg, size):
        stn = rotstn.RotationSTN(3, **cfg)
        x, y = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
        out = _call(stn, x, y)
        assert out.warped.shape == x.shape and out.angle.shape == (2,)
        assert len(out.steps) == 1

    def test_starts_at_identity(self, cfg):
        torch.manual_seed(0)
        stn = rotstn.RotationSTN(3, **cfg)
        x, y = torch.rand(4, 3, 20, 20), torch.rand(4, 3, 20, 20)
        with torch.no_grad():
            out = _call(stn, x, y)
        assert out.angle.abs().max() < 1e-3
        torch.testing.assert_close(out.warped, x, atol=2e-3, rtol=0)
        # By construction (the head's initialisation), not approximately.
        assert torch.equal(out.angle, torch.zeros(4)) and torch.equal(out.warped, x)

    def test_forward_is_a_function_of_inputs_and_parameters(self, cfg):
        # No counter: the same batch gives the same output in every call, training or not.
        torch.manual_seed(3)
        stn = rotstn.RotationSTN(3, identity_start=False, center=(9.0, 10.5), **cfg)
        x, y = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 20, 20)
        for mode in (stn.train, stn.eval):
            mode()
            first, second = _call(stn, x, y), _call(stn, x, y)
            assert torch.equal(first.angle, second.angle) and torch.equal(first.warped, second.warped)
        # state_dict: the parameters and the fixed centre, nothing that counts calls.
        assert set(stn.state_dict()) == {n for n, _ in stn.named_parameters()} | {"center"}

    @pytest.mark.parametrize("what", ["warped", "angle"])
    def test_every_encoder_parameter_gets_a_gradient(self, cfg, what):
        # A head that is exactly the identity for every input passes the encoder a zero
        # gradient on the first step (heads.py); that step moves the head's last layer,
        # and from the second step on every parameter learns.
        torch.manual_seed(1)
        stn = rotstn.RotationSTN(3, **cfg)
        x = torch.rand(3, 3, 20, 20)
        y = rotstn.rotate(x, torch.tensor([0.5, -1.0, 2.0]))

        def loss_fn():
            out = _call(stn, x, y)
            if what == "warped":
                return F.mse_loss(out.warped, y)
            return stn.angle_loss(out, torch.tensor([0.5, -1.0, 2.0]))

        opt = torch.optim.Adam(stn.parameters(), lr=1e-2)
        loss_fn().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stn.head.parameters())
        opt.step()
        opt.zero_grad()
        loss_fn().backward()
        for name, p in stn.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"

    def test_refinement_composes_and_resamples_the_original_once(self, cfg):
        torch.manual_seed(2)
        stn = rotstn.RotationSTN(3, steps=3, identity_start=False, **cfg)  # off the identity
        x, y = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 20, 20)
        out = _call(stn, x, y)
        assert len(out.steps) == 3
        total = sum(pred.angle for _, pred in out.steps)
        torch.testing.assert_close(out.angle, total)
        for i, (base, _) in enumerate(out.steps):
            torch.testing.assert_close(base, sum((p.angle for _, p in out.steps[:i]), torch.zeros(2)))
        torch.testing.assert_close(out.warped, rotstn.rotate(x, out.angle), rtol=0, atol=0)
        twice = rotstn.rotate(rotstn.rotate(x, out.steps[0][1].angle), out.angle - out.steps[0][1].angle)
        assert (twice - out.warped).abs().max() > 1e-3  # resampling twice would blur


class TestSignConvention:
    def test_untrained_polar_stn_recovers_scipy_rotation(self):
        # scipy.ndimage.rotate is the reference for the sign: rotate(moving, θ) ≈ fixed.
        moving = _crops(3, 32, seed=3)
        degrees = [40.0, -120.0, 170.0]
        fixed = torch.stack(
            [
                torch.from_numpy(ndimage.rotate(m[0].numpy(), d, reshape=False, order=1)).unsqueeze(0)
                for m, d in zip(moving, degrees, strict=True)
            ]
        ) * _disk(32, 32)
        stn = rotstn.RotationSTN(1, identity_start=False).eval()
        with torch.no_grad():
            out = stn(moving, fixed.float())
        err = rotstn.losses.angular_error(out.angle, torch.deg2rad(torch.tensor(degrees)), degrees=True)
        assert err.max() < 2.0, err

    def test_single_input_canonical_pose_sign(self, one_thread):
        # Trained on one picture at random angles, rotate(x, angle) must bring x back upright.
        torch.manual_seed(0)
        base = _crops(1, 24, seed=5)
        stn = rotstn.RotationSTN(1, paired=False, bins=64)
        opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            a = (torch.rand(16, generator=g) * 2 - 1) * math.pi
            x = rotstn.rotate(base, a)
            loss = stn.angle_loss(stn(x), -a)
            opt.zero_grad()
            loss.backward()
            opt.step()
        stn.eval()
        a = torch.linspace(-3.0, 3.0, 13)
        with torch.no_grad():
            out = stn(rotstn.rotate(base, a))
        err = rotstn.losses.angular_error(out.angle, -a, degrees=True)
        assert err.mean() < 3.0, err
        inner = _disk(24, 24).bool()
        assert (out.warped[:, 0][:, inner] - base[0, 0][inner]).abs().mean() < 0.05


class TestRotatedBy:
    def _fit(self, rotated_by):
        # One picture at random angles, x = rotate(base, a); the default unpaired STN.
        torch.manual_seed(0)
        base = _crops(1, 24, seed=5)
        stn = rotstn.RotationSTN(1, paired=False, bins=64)
        opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            a = (torch.rand(16, generator=g) * 2 - 1) * math.pi
            out = stn(rotstn.rotate(base, a))
            loss = stn.angle_loss(out, rotated_by=a) if rotated_by else stn.angle_loss(out, a)
            opt.zero_grad()
            loss.backward()
            opt.step()
        a = torch.linspace(-3.0, 3.0, 13)
        with torch.no_grad():
            out = stn.eval()(rotstn.rotate(base, a))
        # The error against the angle it was trained to give: -a, or a for the wrong sign.
        trained_towards = -a if rotated_by else a
        return rotstn.losses.angular_error(out.angle, trained_towards, degrees=True).mean()

    def test_unpaired_label_read_as_rotated_by_fits(self, one_thread):
        assert self._fit(rotated_by=True) < 3.0

    def test_unpaired_label_read_as_target_cannot_fit(self, one_thread):
        # The trap rotated_by= exists for: the polar encoder is rotation-equivariant, its angle
        # for rotate(c, a) moves by -a, so "the angle it was rotated by" read as the target
        # cannot be fitted: trained towards a, it stays far from a.
        assert self._fit(rotated_by=False) > 30.0

    def test_paired_rotated_by_is_the_aligning_angle(self):
        # moving = rotate(fixed, a): the untrained polar STN already finds -a, the aligning
        # angle, so its loss is small for rotated_by=a and large for the target a.
        fixed = _crops(3, 32, seed=3)
        a = torch.tensor([0.7, -2.0, 2.6])
        moving = rotstn.rotate(fixed, a) * _disk(32, 32)
        stn = rotstn.RotationSTN(1, identity_start=False).eval()
        with torch.no_grad():
            out = stn(moving, fixed)
            right, wrong = stn.angle_loss(out, rotated_by=a), stn.angle_loss(out, a)
            torch.testing.assert_close(right, stn.angle_loss(out, rotstn.wrap_angle(-a)))
        err = rotstn.losses.angular_error(out.angle, -a, degrees=True)
        assert err.max() < 2.0 and wrong > 10 * right

    def test_symmetry_wraps_the_target(self):
        # With symmetry=2 the target -a is only defined modulo π.
        stn = rotstn.RotationSTN(1, paired=False, head="unit_vector", symmetry=2, identity_start=False)
        out = stn(torch.rand(2, 1, 16, 16))
        a = torch.tensor([0.4, -1.1])
        torch.testing.assert_close(
            stn.angle_loss(out, rotated_by=a), stn.angle_loss(out, rotstn.wrap_angle(-a + math.pi))
        )

    def test_exactly_one_target(self):
        stn = rotstn.RotationSTN(1, paired=False)
        out = stn(torch.rand(2, 1, 8, 8))
        with pytest.raises(ValueError, match=r"exactly one of target_angle .* got neither"):
            stn.angle_loss(out)
        with pytest.raises(ValueError, match=r"exactly one of target_angle .* got both"):
            stn.angle_loss(out, torch.zeros(2), rotated_by=torch.zeros(2))
        with pytest.raises(ValueError, match=r"rotated_by must be a tensor of shape \(2,\), got \(3,\)"):
            stn.angle_loss(out, rotated_by=torch.zeros(3))
        with pytest.raises(TypeError):
            stn.angle_loss(out, torch.zeros(2), torch.zeros(2))  # rotated_by is keyword-only


@pytest.mark.usefixtures("one_thread")
class TestTraining:
    def test_concat_unit_vector_stn_learns_from_identity(self):
        # A tiny paired STN with a unit-vector head, trained on a small angle range, beats the identity.
        torch.manual_seed(0)
        imgs = _crops(8, 16, seed=10)
        stn = rotstn.RotationSTN(
            1, head="unit_vector", encoder=encoders.ConcatEncoder(1, width=8, out_features=32)
        )
        opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)

        def batch(n):
            idx = torch.randint(0, 8, (n,), generator=g)
            a = (torch.rand(n, generator=g) * 2 - 1) * 0.6
            return imgs[idx], rotstn.rotate(imgs[idx], a), a

        m, f, a = batch(64)
        before = stn.angle_loss(stn(m, f), a).item()
        for _ in range(150):
            mb, fb, ab = batch(32)
            loss = stn.angle_loss(stn(mb, fb), ab)
            opt.zero_grad()
            loss.backward()
            opt.step()
        stn.eval()
        with torch.no_grad():
            out = stn(m, f)
        err = rotstn.losses.angular_error(out.angle, a, degrees=True).mean()
        identity_err = torch.rad2deg(a.abs()).mean()
        assert stn.angle_loss(out, a).item() < 0.3 * before
        assert err < 0.5 * identity_err, (err, identity_err)


class TestEncoders:
    @pytest.mark.parametrize("size", [32, 21])
    def test_polar_grid_turns_rotation_into_a_shift(self, size):
        # torch.rot90 is an exact +90° turn: the polar image must roll by exactly a quarter of the bins.
        x = torch.rand(1, 2, size, size, dtype=torch.float64)
        bins = 64
        grid = encoders.polar_grid((size, size), 12, bins, dtype=torch.float64)
        p = F.grid_sample(x, grid, align_corners=False)
        q = F.grid_sample(torch.rot90(x, 1, (-2, -1)), grid, align_corners=False)
        torch.testing.assert_close(q, torch.roll(p, bins // 4, dims=-1), atol=1e-12, rtol=0)

    def test_polar_scores_shift_with_the_rotation(self):
        # Equivariance: turning `fixed` by one more bin moves the score peak by one bin.
        torch.manual_seed(0)
        enc = encoders.PolarCorrelationEncoder(1, bins=32).double()
        x = _crops(1, 32, seed=2).double()
        step = 2 * math.pi / 32
        peaks = [int(enc(x, rotstn.rotate(x, k * step)).argmax()) for k in (3, 4, 5)]
        assert peaks == [3, 4, 5]

    def test_gradcheck_through_polar_scores(self):
        torch.manual_seed(0)
        enc = encoders.PolarCorrelationEncoder(1, bins=8, radii=3, width=2, depth=2).double()
        m = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
        f = torch.rand(1, 1, 6, 6, dtype=torch.float64)
        assert gradcheck(lambda a: enc(a, f), (m,))

    def test_gradcheck_stn_angle_wrt_images(self):
        torch.manual_seed(0)
        stn = rotstn.RotationSTN(
            1,
            encoder=encoders.PolarCorrelationEncoder(1, bins=16, radii=3, width=2, depth=2),
            bins=16,
            identity_start=False,
        ).double()
        m = _crops(1, 6, seed=4).double().requires_grad_()
        f = rotstn.rotate(m.detach(), 0.9)
        assert gradcheck(lambda a, b: stn(a, b).angle, (m, f.requires_grad_()))

    def test_errors(self):
        stn = rotstn.RotationSTN(1)
        with pytest.raises(ValueError, match="fixed is required"):
            stn(torch.rand(1, 1, 8, 8))
        with pytest.raises(ValueError, match="moving and fixed must have the same shape"):
            stn(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
        with pytest.raises(ValueError, match="paired=False"):
            rotstn.RotationSTN(1, paired=False)(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            rotstn.RotationSTN(1, steps=0)
        with pytest.raises(TypeError, match="head must be"):
            rotstn.RotationSTN(1, head=torch.nn.Linear(2, 2))
        with pytest.raises(ValueError, match=r"target_angle must be a tensor of shape \(1,\)"):
            out = stn(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
            stn.angle_loss(out, torch.zeros(2))
        with pytest.raises(ValueError, match="in_channels must be a positive int"):
            encoders.ConvEncoder(0)

    def test_custom_head_instance(self):
        head = heads.VonMisesHead(128, symmetry=2)
        stn = rotstn.RotationSTN(1, paired=False, head=head)
        out = stn(torch.rand(2, 1, 16, 16))
        assert out.concentration.shape == (2,) and stn.head is head


def _digit_batch(seed: int = 0, n: int = 64, max_deg: float = 60.0):
    """scikit-learn's 8×8 digits at 24×24, a batch turned by α uniform in ±max_deg, and a frozen classifier.

    The classifier scores a digit by its distance to each class's mean upright digit:
    fixed, it prefers upright digits, so its class loss says which way each one must turn.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16)[:, None]
    x = F.pad(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    y = torch.from_numpy(d.target)
    means = torch.stack([x[y == k].mean(0) for k in range(10)])

    def classify(im):
        return -((im[:, None] - means[None]) ** 2).flatten(2).sum(-1) / 4

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n]
    alpha = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_deg)
    return x[idx], rotstn.rotate(x[idx], alpha), y[idx], alpha, classify


class TestDownstreamLoss:
    """A class loss alone, a few Adam steps from the identity start, turns θ towards undoing the rotation."""

    @pytest.mark.parametrize("paired", [False, True], ids=["single", "paired"])
    def test_class_loss_turns_theta(self, paired, one_thread):
        upright, x, y, alpha, classify = _digit_batch()
        torch.manual_seed(0)
        stn = rotstn.RotationSTN(1, paired=paired)
        opt = torch.optim.Adam(stn.parameters(), lr=3e-3)

        def run():
            return stn(x, upright) if paired else stn(x)

        for step in range(3):
            loss = F.cross_entropy(classify(run().warped), y)
            opt.zero_grad()
            loss.backward()
            if step == 0 and not paired:
                # At θ = 0 the gradient reaches the template itself, not one gain (rotstn/modules.py).
                assert stn.encoder.template.grad.abs().sum() > 0
            opt.step()
        with torch.no_grad():
            theta = run().angle
        left = rotstn.wrap_angle(theta + alpha).abs().median()  # the rotation still to undo
        assert theta.abs().median() > math.radians(5), "θ stayed at the identity"
        assert left < 0.6 * alpha.abs().median(), (math.degrees(left), math.degrees(alpha.abs().median()))
