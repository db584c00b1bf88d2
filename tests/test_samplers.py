import diffusers
import pytest
import torch

from genvs.core.config import spec
from genvs.core.diffusion import CosineLogSNRSchedule, DiscreteSchedule, alpha_sigma
from genvs.core.samplers import DDIMScheduler, Sampler, cfg_combine, stochastic_conditioning

MU, STD = 0.5, 0.8  # data distribution N(MU, STD^2) per dimension


def optimal_eps(z, logsnr):
    """The exact E[eps | z] for Gaussian data: the Bayes-optimal eps-prediction network."""
    a, s = alpha_sigma(logsnr.view(-1, *([1] * (z.ndim - 1))).double())
    z = z.double()
    return (s * (z - a * MU) / (a**2 * STD**2 + s**2)).float()


@pytest.mark.parametrize(
    "scheduler,steps",
    [
        (spec("diffusers.DDPMScheduler", clip_sample=False), 500),
        (spec(DDIMScheduler, timestep_spacing="linspace", clip_sample=False), 97),  # 1000 % 97 != 0
        (spec(DDIMScheduler, timestep_spacing="trailing", clip_sample=False), 120),
        (spec("diffusers.DPMSolverMultistepScheduler", algorithm_type="dpmsolver++"), 25),
    ],
)
@pytest.mark.parametrize("schedule", [CosineLogSNRSchedule(), DiscreteSchedule("linear")])
def test_sampler_reproduces_gaussian(scheduler, steps, schedule):
    """With the Bayes-optimal denoiser of Gaussian data, every sampler must return that Gaussian."""
    sampler = Sampler(scheduler, num_steps=steps)
    g = torch.Generator().manual_seed(0)
    x = sampler.loop(lambda z, lam, t: optimal_eps(z, lam), (20000, 1), schedule, "eps", generator=g)
    # Monte-Carlo error of 20000 samples is ~0.005; the rest is the samplers' discretisation error
    assert abs(float(x.mean()) - MU) < 0.015
    assert abs(float(x.std()) - STD) < 0.015


@pytest.mark.parametrize("cls", [DDIMScheduler, diffusers.DDPMScheduler])
def test_scheduler_built_in_python_binds_to_the_model_schedule(cls):
    """A scheduler constructed in Python (not from a config) remembers which arguments took their defaults,
    and diffusers' `from_config` resets those: binding must still install the model's betas and prediction."""
    schedule = CosineLogSNRSchedule()
    for scheduler in (cls(timestep_spacing="trailing"), spec(cls, timestep_spacing="trailing")):
        bound = Sampler(scheduler).bind(schedule, "v")
        assert bound.config.prediction_type == "v_prediction"
        torch.testing.assert_close(bound.alphas_cumprod.double(), schedule.alphas_cumprod().double(), rtol=1e-4, atol=1e-9)


def test_diffusers_ddim_previous_timestep_bug_is_fixed():
    """diffusers' DDIM assumes prev = t - T // N; with linspace spacing the true next timestep differs."""
    ours = DDIMScheduler(timestep_spacing="linspace", clip_sample=False)
    theirs = diffusers.DDIMScheduler(timestep_spacing="linspace", clip_sample=False)
    for s in (ours, theirs):
        s.set_timesteps(7)
    ts = ours.timesteps.tolist()
    assert ts[0] - ts[1] != 1000 // 7  # the gap diffusers assumes is wrong here
    z = torch.randn(4, 1)
    eps = torch.randn(4, 1)
    ac = ours.alphas_cumprod
    x0 = (z - (1 - ac[ts[0]]).sqrt() * eps) / ac[ts[0]].sqrt()
    expected = ac[ts[1]].sqrt() * x0 + (1 - ac[ts[1]]).sqrt() * eps  # deterministic DDIM to the next listed t
    torch.testing.assert_close(ours.step(eps, ts[0], z).prev_sample, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs.step(eps, ts[0], z).prev_sample, expected, atol=1e-4)


def test_cfg_combine():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_combine(c, u, 1.0) == 2.0 and cfg_combine(c, u, 3.0) == 4.0 and cfg_combine(c, u, 0.0) == 1.0


def test_stochastic_conditioning_draws_from_growing_view_set():
    B, Nc, Nt = 3, 2, 4
    context = torch.rand(B, Nc, 1, 2, 2)
    choices = {j: [] for j in range(Nt)}
    seen_images = []

    def denoise(z, logsnr, cond_img, cond_idx, j):
        choices[j].append(cond_idx.clone())
        seen_images.append((j, cond_idx.clone(), cond_img.clone()))
        return torch.zeros_like(z)  # predicts eps = 0 -> deterministic output per target

    sampler = Sampler(spec(DDIMScheduler, clip_sample=False), num_steps=60)
    g = torch.Generator().manual_seed(0)
    out = stochastic_conditioning(sampler, denoise, context, Nt, CosineLogSNRSchedule(), "eps", generator=g)
    assert out.shape == (B, Nt, 1, 2, 2)
    for j in range(Nt):
        c = torch.stack(choices[j])  # [steps, B]
        assert c.min() >= 0 and c.max() < Nc + j  # only views available so far
        assert set(c.unique().tolist()) == set(range(Nc + j))  # every available view gets drawn
        assert (c != c[0]).any()  # redrawn at every step, independently per scene
    # conditioning images are the pool: context views, then the targets generated before
    pool = torch.cat([context, out], 1)
    for j, idx, img in seen_images:
        torch.testing.assert_close(img, pool[torch.arange(B), idx])
