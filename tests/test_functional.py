"""rotate, rotation_matrix and the angle helpers, kornia-style: smoke,
exceptions, cardinality, gradients, torch.compile, module == functional."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import real_image
from torch.autograd import gradcheck, gradgradcheck

import rotstn

# One unit in the last place near 1.0: the input and the output are each rounded once.
ULP = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-5}


class TestRotate:
    def test_smoke(self, device, dtype):
        x = torch.rand(2, 3, 9, 12, device=device).to(dtype)
        out = rotstn.rotate(x, torch.tensor([0.2, -0.4], device=device))
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert torch.isfinite(out).all()

    def test_half_precision_matches_float32(self, device, dtype):
        # Coordinates stay float32 for half images: the result is the float32
        # result rounded once, not one computed from rounded coordinates.
        x = real_image(64, 96).float().to(device)
        ref = rotstn.rotate(x, 1.0)
        out = rotstn.rotate(x.to(dtype), 1.0)
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=ULP[dtype])

    def test_identity(self, device):
        x = torch.rand(2, 1, 7, 10, device=device)
        torch.testing.assert_close(rotstn.rotate(x, 0.0), x)

    @pytest.mark.parametrize(
        "img_shape, angle_shape, center_shape, out_shape",
        [
            ((3, 8, 9), (), None, (3, 8, 9)),
            ((3, 8, 9), (4,), None, (4, 3, 8, 9)),
            ((3, 8, 9), (), (5, 2), (5, 3, 8, 9)),
            ((1, 3, 8, 9), (), (2,), (1, 3, 8, 9)),
            ((4, 3, 8, 9), (1,), None, (4, 3, 8, 9)),
            ((4, 3, 8, 9), (4,), (4, 2), (4, 3, 8, 9)),
            ((1, 3, 8, 9), (6,), (1, 2), (6, 3, 8, 9)),
            ((0, 3, 8, 9), (0,), None, (0, 3, 8, 9)),
            ((0, 3, 8, 9), (), None, (0, 3, 8, 9)),
            ((2, 1, 1, 1), (2,), None, (2, 1, 1, 1)),
        ],
    )
    def test_cardinality(self, img_shape, angle_shape, center_shape, out_shape):
        x = torch.rand(img_shape)
        a = torch.rand(angle_shape)
        c = None if center_shape is None else torch.rand(center_shape) * 4
        assert rotstn.rotate(x, a, c).shape == out_shape

    def test_broadcast_equals_loop(self):
        x = real_image(20, 30).float()
        angles = torch.tensor([0.1, 1.0, -2.0])
        out = rotstn.rotate(x[0], angles)
        for i, a in enumerate(angles):
            torch.testing.assert_close(out[i], rotstn.rotate(x[0], a))

    def test_empty_batch_backward(self):
        x = torch.rand(0, 2, 5, 5, requires_grad=True)
        a = torch.zeros(0, requires_grad=True)
        out = rotstn.rotate(x, a)
        out.sum().backward()
        assert x.grad.shape == x.shape and a.grad.shape == a.shape

    @pytest.mark.parametrize(
        "kwargs, err, match",
        [
            (dict(image=torch.rand(5, 5)), ValueError, r"image must have shape .*got \(5, 5\)"),
            (dict(image=torch.rand(1, 1, 1, 5, 5)), ValueError, r"image must have shape"),
            (
                dict(image=torch.zeros(1, 5, 5, dtype=torch.uint8)),
                TypeError,
                r"image must be a floating.*uint8",
            ),
            (
                dict(image=torch.zeros(1, 5, 5, dtype=torch.bool)),
                TypeError,
                r"image must be a floating.*bool",
            ),
            (dict(image=torch.zeros(1, 5, 5, dtype=torch.int64)), TypeError, r"image must be a floating"),
            (dict(image=torch.zeros(1, 0, 5)), ValueError, r"H >= 1 and W >= 1"),
            (dict(image="cat.png"), TypeError, r"image must be a torch.Tensor, got str"),
            (
                dict(angle=torch.zeros(3)),
                ValueError,
                r"angle must have shape \(\) or \(B,\) with B=4, got \(3,\)",
            ),
            (dict(angle=torch.zeros(4, 1)), ValueError, r"angle must have shape .*got \(4, 1\)"),
            (dict(angle="90"), TypeError, r"angle must be a real number"),
            (dict(angle=True), TypeError, r"angle must be a real number"),
            (dict(angle=torch.zeros(4, dtype=torch.complex64)), TypeError, r"angle must be a real tensor"),
            (dict(center=torch.zeros(3)), ValueError, r"center must have shape .*got \(3,\)"),
            (
                dict(center=torch.zeros(3, 2)),
                ValueError,
                r"center must have shape \(2,\) or \(B, 2\) with B=4",
            ),
            (dict(center=torch.zeros(4, 3)), ValueError, r"center must have shape"),
            (
                dict(mode="linear"),
                ValueError,
                r"mode must be one of 'nearest', 'bilinear', 'bicubic'; got 'linear'",
            ),
            (dict(padding_mode="constant"), ValueError, r"padding_mode must be one of .*got 'constant'"),
            (dict(align_corners=None), TypeError, r"align_corners must be a bool, got NoneType"),
        ],
    )
    def test_exceptions(self, kwargs, err, match):
        args = dict(image=torch.rand(4, 1, 5, 5), angle=torch.zeros(4))
        args.update(kwargs)
        image, angle = args.pop("image"), args.pop("angle")
        with pytest.raises(err, match=match):
            rotstn.rotate(image, angle, **args)

    def test_batch_mismatch_names_all(self):
        with pytest.raises(
            ValueError, match=r"batch sizes do not match: image has 1, angle has 3, center has 2"
        ):
            rotstn.rotate(torch.rand(1, 1, 5, 5), torch.zeros(3), torch.zeros(2, 2))

    def test_other_device(self):
        meta = torch.zeros((), device="meta")
        with pytest.raises(ValueError, match=r"angle is on meta but image is on cpu"):
            rotstn.rotate(torch.rand(1, 5, 5), meta)
        with pytest.raises(ValueError, match=r"center is on meta but image is on cpu"):
            rotstn.rotate(torch.rand(1, 5, 5), 0.1, torch.zeros(2, device="meta"))

    def test_nearest_warns_about_zero_gradient(self):
        a = torch.tensor(0.3, requires_grad=True)
        with pytest.warns(UserWarning, match="zero gradient"):
            rotstn.rotate(torch.rand(1, 5, 5), a, mode="nearest")

    @pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
    @pytest.mark.parametrize("size", [(5, 6), (6, 5)])
    def test_gradcheck(self, mode, size, device):
        x = torch.rand(2, 2, *size, dtype=torch.float64, device=device, requires_grad=True)
        # Angles and centres off the pixel grid, where bilinear is smooth.
        a = torch.tensor([0.3, -1.1], dtype=torch.float64, device=device, requires_grad=True)
        c = torch.tensor([[2.23, 1.71], [3.1, 2.4]], dtype=torch.float64, device=device, requires_grad=True)
        for padding in ("zeros", "border", "reflection"):

            def f(x, a, c, padding=padding):
                return rotstn.rotate(x, a, c, mode=mode, padding_mode=padding)

            assert gradcheck(f, (x, a, c))
            assert gradgradcheck(f, (x, a, c))

    def test_gradients_reach_inputs_in_half(self, device):
        x = torch.rand(1, 1, 8, 8, device=device).to(torch.bfloat16).requires_grad_()
        a = torch.tensor(0.3, device=device, requires_grad=True)
        rotstn.rotate(x, a).float().sum().backward()
        assert x.grad.dtype == torch.bfloat16 and a.grad is not None and a.grad != 0

    def test_identity_gradient_is_a_descent_direction(self):
        # θ = 0 sits on the kink of bilinear sampling; the autograd value there
        # is one-sided per pixel but must still point towards the target.
        for seed in range(4):
            x = real_image(64, 64, seed=seed)
            for target in (0.05, -0.05, 0.3, -0.3):
                goal = rotstn.rotate(x, target, mode="bicubic")
                th = torch.zeros((), dtype=torch.float64, requires_grad=True)
                F.mse_loss(rotstn.rotate(x, th), goal).backward()
                assert th.grad * target < 0

    def test_training_from_identity_reduces_error(self):
        x = real_image(64, 64, seed=7).float()
        target = torch.tensor(0.2)
        goal = rotstn.rotate(x, target, mode="bicubic")
        th = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([th], lr=0.01)
        errors = []
        for _ in range(40):
            opt.zero_grad()
            F.mse_loss(rotstn.rotate(x, th), goal).backward()
            opt.step()
            errors.append(abs(th.item() - target.item()))
        assert errors[4] < 0.9 * target.item()
        assert errors[-1] < 0.1 * target.item()

    def test_seed_pitfall_torch_tensor_detaches(self):
        theta = torch.tensor(0.4, requires_grad=True)
        naive = torch.tensor(
            [[torch.cos(theta), -torch.sin(theta), 0.0], [torch.sin(theta), torch.cos(theta), 0.0]]
        )
        assert naive.grad_fn is None and not naive.requires_grad
        ours = rotstn.rotation_matrix(theta, (8, 8))
        assert ours.grad_fn is not None
        ours.sum().backward()
        assert theta.grad is not None and theta.grad != 0

    def test_dynamo(self):
        x = real_image(16, 20).float()
        a = torch.tensor([0.3])
        compiled = torch.compile(rotstn.rotate, fullgraph=True)
        torch.testing.assert_close(compiled(x, a), rotstn.rotate(x, a))

    def test_module_equals_functional(self, device):
        x = torch.rand(3, 2, 10, 14, device=device)
        a = torch.tensor([0.1, 0.5, -3.0], device=device)
        kw = dict(mode="bicubic", padding_mode="reflection", align_corners=True)
        ref = rotstn.rotate(x, a, (4.0, 5.5), **kw)
        torch.testing.assert_close(rotstn.Rotate(a, (4.0, 5.5), **kw).to(device)(x), ref)
        torch.testing.assert_close(rotstn.Rotate(center=(4.0, 5.5), **kw).to(device)(x, a), ref)

    def test_module_learnable_angle(self):
        layer = rotstn.Rotate(learnable=True)
        assert isinstance(layer.angle, torch.nn.Parameter) and layer.angle.item() == 0.0
        x = real_image(16, 16).float()
        F.mse_loss(layer(x), rotstn.rotate(x, 0.2)).backward()
        assert layer.angle.grad is not None
        with pytest.raises(ValueError, match="angle is required"):
            rotstn.Rotate()(x)


class TestRotationMatrix:
    def test_cardinality(self):
        assert rotstn.rotation_matrix(0.3, (4, 5)).shape == (1, 2, 3)
        assert rotstn.rotation_matrix(torch.zeros(6), (4, 5)).shape == (6, 2, 3)
        assert rotstn.rotation_matrix(0.1, (4, 5), torch.zeros(3, 2)).shape == (3, 2, 3)

    def test_square_centre_is_plain_rotation(self):
        m = rotstn.rotation_matrix(torch.tensor(0.5, dtype=torch.float64), (8, 8))
        c, s = math.cos(0.5), math.sin(0.5)
        expect = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=torch.float64)
        torch.testing.assert_close(m, expect)

    def test_gradcheck(self):
        a = torch.tensor([0.3, 2.0], dtype=torch.float64, requires_grad=True)
        c = torch.tensor([[1.5, 2.5], [0.2, 3.0]], dtype=torch.float64, requires_grad=True)
        assert gradcheck(lambda a, c: rotstn.rotation_matrix(a, (5, 9), c), (a, c))

    def test_exceptions(self):
        with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
            rotstn.rotation_matrix(0.1, (4,))
        with pytest.raises(ValueError, match=r"batch sizes do not match: angle has 2, center has 3"):
            rotstn.rotation_matrix(torch.zeros(2), (4, 4), torch.zeros(3, 2))


class TestAngleHelpers:
    def test_wrap_range_and_periodicity(self):
        a = torch.linspace(-20, 20, 1001, dtype=torch.float64)
        w = rotstn.wrap_angle(a)
        assert (w > -math.pi).all() and (w <= math.pi).all()
        torch.testing.assert_close(torch.cos(w), torch.cos(a))
        torch.testing.assert_close(torch.sin(w), torch.sin(a))
        assert rotstn.wrap_angle(-math.pi).item() == pytest.approx(math.pi)

    def test_difference(self):
        d = rotstn.angle_difference(torch.tensor([0.1, 3.0]), torch.tensor([2 * math.pi - 0.1, -3.0]))
        torch.testing.assert_close(d, torch.tensor([0.2, 6.0 - 2 * math.pi]))

    def test_difference_gradient(self):
        a = torch.tensor([0.3, 3.0], dtype=torch.float64, requires_grad=True)
        assert gradcheck(lambda a: rotstn.angle_difference(a, torch.tensor(1.0, dtype=torch.float64)), (a,))
