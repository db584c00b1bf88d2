import math

import diffusers
import pytest
import torch

from genvs.core.diffusion import (
    EMA,
    CosineLogSNRSchedule,
    DiscreteSchedule,
    alpha_sigma,
    diffusion_loss,
    predict_x0_eps,
    prediction_target,
    q_sample,
)


def test_cosine_logsnr_schedule_matches_formula_and_endpoints():
    s = CosineLogSNRSchedule(-20.0, 20.0)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    lam = s.logsnr(t)
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    expected = (-2 * torch.log(torch.tan(a * t + b))).clamp(-20, 20)
    torch.testing.assert_close(lam, expected)
    assert abs(float(lam[0]) - 20.0) < 1e-6 and abs(float(lam[-1]) + 20.0) < 1e-6
    assert (lam[1:] < lam[:-1]).all()  # strictly decreasing
    al, sg = alpha_sigma(lam)
    torch.testing.assert_close(al**2 + sg**2, torch.ones_like(lam))
    torch.testing.assert_close(al**2 / sg**2, lam.exp(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (dict(beta_schedule="linear"), dict(beta_schedule="linear")),
        (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (dict(beta_schedule="cosine"), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_discrete_schedules_match_diffusers(ours, theirs):
    s = DiscreteSchedule(**ours)
    ref = diffusers.DDPMScheduler(**theirs).alphas_cumprod.double()
    torch.testing.assert_close(s.alphas_cumprod(), ref, rtol=1e-5, atol=1e-7)
    # the continuous view interpolates the grid exactly at t_i = (i + 1) / T
    i = torch.tensor([0, 10, 500, 999])
    lam = s.logsnr((i + 1).double() / 1000)
    torch.testing.assert_close(torch.sigmoid(lam), ref[i], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s.timestep_index((i + 1).float() / 1000), i)
    # betas of the discretisation reproduce alphas_cumprod (what diffusers samplers will use)
    torch.testing.assert_close(torch.cumprod(1 - s.betas(), 0), ref, rtol=1e-5, atol=1e-7)


def test_continuous_schedule_betas_reproduce_alphas_cumprod():
    s = CosineLogSNRSchedule()
    torch.testing.assert_close(torch.cumprod(1 - s.betas(), 0), s.alphas_cumprod(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_parameterisations_round_trip(kind):
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    lam = torch.tensor([-5.0, 0.0, 3.0, 12.0])
    z = q_sample(x0, lam, eps)
    target = prediction_target(x0, eps, lam, kind)
    x0_hat, eps_hat = predict_x0_eps(target, z, lam, kind)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)
    assert diffusion_loss(target, x0, eps, lam, kind).abs().max() < 1e-10


def test_v_definition_and_min_snr_weighting():
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    lam = torch.tensor([-2.0, 1.0, 4.0])
    a, s = alpha_sigma(lam.view(-1, 1, 1, 1))
    torch.testing.assert_close(prediction_target(x0, eps, lam, "v"), a * eps - s * x0)
    # the same wrong x0 estimate, expressed in each parameterisation, gets the same min-SNR loss
    x0_wrong = x0 + 0.1 * torch.randn_like(x0)
    z = q_sample(x0, lam, eps)
    eps_wrong = (z - a * x0_wrong) / s
    losses = {}
    for kind in ("eps", "x0", "v"):
        pred = prediction_target(x0_wrong, eps_wrong, lam, kind)
        losses[kind] = diffusion_loss(pred, x0, eps, lam, kind, weighting="min_snr", min_snr_gamma=5.0)
    torch.testing.assert_close(losses["eps"], losses["x0"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses["v"], losses["x0"], rtol=1e-4, atol=1e-7)
    x0_mse = (x0_wrong - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(losses["x0"], x0_mse * lam.exp().clamp(max=5.0), rtol=1e-4, atol=1e-7)


def test_ema_tracks_trainable_parameters_only_and_swaps_back():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net[1].requires_grad_(False)
    ema = EMA(net, decay=0.5, warmup=False)
    assert ema.names == ["0.weight", "0.bias"]
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.shadow()[0], w0 + 0.5)  # lerp halfway
    trained = net[0].weight.detach().clone()
    with ema.applied(net):
        torch.testing.assert_close(net[0].weight, w0 + 0.5)
    torch.testing.assert_close(net[0].weight, trained)
    assert "shadow__0__weight" in ema.state_dict() and int(ema.num_updates) == 1


def test_ema_warmup_decay():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    for _ in range(5):
        ema.update(net)
    assert ema.current_decay() == pytest.approx(6 / 15)
