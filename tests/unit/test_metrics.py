import math

import pytest
import torch

from optim.metrics import psnr, ssim


def test_psnr_identical_is_infinite():
    x = torch.randn(2, 4, 8, 8)
    assert psnr(x, x.clone()) == math.inf


def test_psnr_matches_hand_computed_value():
    ref = torch.zeros(1, 1, 4, 4)
    ref[0, 0, 0, 0] = 1.0                       # range 1
    cand = ref + 0.1                            # mse 0.01 -> 20 dB
    assert psnr(ref, cand) == pytest.approx(20.0, abs=1e-5)
    assert psnr(ref, cand, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-5)


def test_psnr_decreases_with_noise():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 4, 16, 16, generator=gen)
    noise = torch.randn(ref.shape, generator=gen)
    assert psnr(ref, ref + 0.01 * noise) > psnr(ref, ref + 0.1 * noise) > psnr(ref, ref + noise)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(torch.zeros(1, 2), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 9, 3))


def test_ssim_identical_is_one_and_noise_lowers_it():
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(2, 32, 32, 3, generator=gen)
    assert ssim(img, img.clone()) == pytest.approx(1.0, abs=1e-12)
    noisy = (img + 0.2 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    assert 0.0 < ssim(img, noisy) < 0.9


def test_ssim_of_constant_shift_depends_on_luminance_term_only():
    img = torch.full((1, 16, 16, 1), 0.5)
    # For constant images only the luminance term remains: (2*mu_x*mu_y + c1) / (mu_x^2 + mu_y^2 + c1).
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1)
    assert ssim(img, img + 0.1) == pytest.approx(expected, rel=1e-6)


def test_ssim_accepts_video_layout():
    vid = torch.rand(1, 3, 16, 16, 3)
    assert ssim(vid, vid) == pytest.approx(1.0)
