"""Noise schedules (step for step against diffusers' DDPMScheduler / DDIMScheduler), the forward process in
closed form, dynamic thresholding, and the shared diffusion core: loss, condition dropout, guidance, sampling."""
import math

import pytest
import torch

from allformers.diffusion import (DDIMScheduler, DDPMScheduler, NoiseScheduler, diffusion_loss, drop_condition,
                                  dynamic_threshold, guided_prediction, rescale_guidance, sample)
from allformers.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 4, 4)
PAT = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(7))


def fake_model(x, t):
    """A deterministic stand-in for a denoiser whose output depends on x and t."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.3 * x + torch.sin(t / 50.0) * PAT


def run_both(ours, theirs, steps, seed=0, **step_kw):
    """Sample with both schedulers from the same x_T and seeds; the largest difference over every step."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * 1.5
    a, b = x.clone(), x.clone()
    if steps is not None:
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    ga, gb = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for t in theirs.timesteps:
        ra = ours.step(fake_model(a, t), t, a, generator=ga, **step_kw)
        rb = theirs.step(fake_model(b, t), t, b, generator=gb, **step_kw)
        worst = max(worst, float((ra.prev_sample - rb.prev_sample).abs().max()),
                    float((ra.pred_original_sample - rb.pred_original_sample).abs().max()))
        a, b = ra.prev_sample, rb.prev_sample
    return worst, a


DDPM_CASES = [
    dict(),  # linear, epsilon, fixed_small, clip, all 1000 steps
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", steps=20),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample",
         clip_sample=False, steps=25, timestep_spacing="trailing"),
    dict(variance_type="fixed_large", steps=10, timestep_spacing="linspace"),
    dict(variance_type="fixed_small_log", steps=10, steps_offset=1),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5, steps=20),
]


@pytest.mark.parametrize("case", DDPM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_ddpm_equals_diffusers_every_step(case):
    case = dict(case)
    steps = case.pop("steps", None)
    worst, _ = run_both(DDPMScheduler(**case), diffusers.DDPMScheduler(**case), steps)
    assert worst <= 1e-6


DDIM_CASES = [
    dict(steps=10),
    dict(steps=25, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", eta=0.5),
    dict(steps=20, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
         steps_offset=1, clip_sample=False, eta=1.0),
    dict(steps=8, prediction_type="sample", timestep_spacing="trailing", use_clipped_model_output=True, eta=0.3),
    dict(steps=16, thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=3.0, timestep_spacing="linspace"),
]


@pytest.mark.parametrize("case", DDIM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_ddim_equals_diffusers_every_step(case):
    case = dict(case)
    steps = case.pop("steps")
    step_kw = {k: case.pop(k) for k in ("eta", "use_clipped_model_output") if k in case}
    worst, _ = run_both(DDIMScheduler(**case), diffusers.DDIMScheduler(**case), steps, **step_kw)
    assert worst <= 1e-6


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_add_noise_and_velocity_equal_diffusers(schedule):
    ours, theirs = DDPMScheduler(beta_schedule=schedule), diffusers.DDPMScheduler(beta_schedule=schedule)
    assert torch.equal(ours.betas, theirs.betas) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 870])
    assert torch.equal(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))


def test_forward_process_in_closed_form():
    """betas 0.1, 0.2, 0.3: abar = 0.9, 0.72, 0.504, and x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    s = DDPMScheduler(num_train_timesteps=3, beta_start=0.1, beta_end=0.3)
    assert torch.allclose(s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504]), atol=1e-7)
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    got = s.add_noise(x0, eps, torch.tensor([1]))
    assert abs(float(got) - (2 * math.sqrt(0.72) - math.sqrt(0.28))) < 1e-6  # 1.167906...
    v = s.get_velocity(x0, eps, torch.tensor([2]))
    assert abs(float(v) - (math.sqrt(0.504) * -1 - math.sqrt(0.496) * 2)) < 1e-6
    # and it is the composition of the one-step kernels q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.full((n,), 2.0)
    for beta in (0.1, 0.2, 0.3):
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, generator=g)
    assert abs(float(x.mean()) - 2 * math.sqrt(0.504)) < 0.01
    assert abs(float(x.var()) - 0.496) < 0.01
    # the training targets
    assert torch.equal(s.training_target(x0, eps, torch.tensor([1])), eps)
    s.prediction_type = "sample"
    assert torch.equal(s.training_target(x0, eps, torch.tensor([1])), x0)


def test_cosine_schedule_by_hand():
    s = DDPMScheduler(num_train_timesteps=10, beta_schedule="squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(s.betas[0]) - (1 - f(0.1) / f(0.0))) < 1e-7
    assert abs(float(s.betas[-1]) - 0.999) < 1e-7  # capped: abar(1) = 0
    assert abs(float(s.alphas_cumprod[4]) - f(0.5) / f(0.0)) < 1e-6


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    def run(eta, seed):
        s = DDIMScheduler(eta=eta)
        s.set_timesteps(10)
        g, y = torch.Generator().manual_seed(seed), x.clone()
        for t in s.timesteps:
            y = s.step(fake_model(y, t), t, y, generator=g).prev_sample
        return y
    assert torch.equal(run(0.0, 1), run(0.0, 2))  # no randomness at all: the seed does not matter
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))


def test_explicit_noise_equals_generator_noise():
    s = DDPMScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    t = s.timesteps[0]
    g = torch.Generator().manual_seed(4)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    a = s.step(fake_model(x, t), t, x, generator=g).prev_sample
    assert torch.equal(a, s.step(fake_model(x, t), t, x, noise=z).prev_sample)


def test_dynamic_thresholding_by_hand_and_against_diffusers():
    x = torch.tensor([[0.5, -4.0, 2.0, 1.0]]).reshape(1, 1, 2, 2)
    # |x| = .5, 4, 2, 1; the 0.5 quantile is 1.5 -> clip to [-1.5, 1.5], divide by 1.5
    got = dynamic_threshold(x, ratio=0.5, max_value=10.0).flatten()
    assert torch.allclose(got, torch.tensor([0.5 / 1.5, -1.0, 1.0, 1 / 1.5]))
    # s is at least 1: then it is plain clipping to [-1, 1]
    small = torch.tensor([0.2, -0.9, 3.0, 0.1]).reshape(1, 1, 2, 2)
    assert torch.allclose(dynamic_threshold(small, ratio=0.5), small.clamp(-1, 1))
    y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    assert torch.equal(dynamic_threshold(y, 0.9, 2.0), ref._threshold_sample(y))


def test_scheduler_errors_and_round_trip():
    with pytest.raises(ConfigError, match="prediction_type"):
        DDPMScheduler(prediction_type="eps")
    with pytest.raises(ConfigError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(ConfigError, match="set_timesteps"):
        DDIMScheduler().step(PAT, 10, PAT)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        DDPMScheduler(num_train_timesteps=10).set_timesteps(11)
    s = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", eta=0.2)
    again = NoiseScheduler.from_dict(s.to_dict())
    assert type(again) is DDIMScheduler and again.to_dict() == s.to_dict()
    assert torch.equal(again.alphas_cumprod, s.alphas_cumprod)


# ---------------------------------------------------------------------- the diffusion core
def cond_model(x, t, emb=None):
    """A toy conditional denoiser: its output depends on x, t and the condition."""
    base = fake_model(x, t)
    return base if emb is None else base + emb.reshape(-1, 1, 1, 1) * x ** 2


def test_guidance_scale_one_is_the_conditional_model():
    x, t = torch.randn(SHAPE), torch.tensor([5, 900])
    cond, null = {"emb": torch.tensor([0.7, -1.3])}, {"emb": torch.tensor(0.0)}
    assert torch.equal(guided_prediction(cond_model, x, t, cond, null, 1.0), cond_model(x, t, **cond))
    c, u = cond_model(x, t, **cond), cond_model(x, t, emb=torch.zeros(2))
    assert torch.allclose(guided_prediction(cond_model, x, t, cond, null, 3.0), u + 3.0 * (c - u), atol=1e-6)
    with pytest.raises(ConfigError, match="keys"):
        guided_prediction(cond_model, x, t, cond, {"other": torch.tensor(0.0)}, 2.0)


def test_guidance_rescale_by_hand_and_against_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(3)
    c, u = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g) * 0.5
    guided = u + 4.0 * (c - u)
    full = rescale_guidance(guided, c, 1.0)  # phi 1: the guided direction at the conditional's scale
    assert torch.allclose(full.flatten(1).std(1), c.flatten(1).std(1), atol=1e-6)
    assert torch.allclose(full / full.flatten(1).norm(dim=1).view(-1, 1, 1, 1),
                          guided / guided.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-6)
    assert torch.equal(rescale_guidance(guided, c, 0.0), guided)
    assert torch.allclose(rescale_guidance(guided, c, 0.7), rescale_noise_cfg(guided, c, guidance_rescale=0.7),
                          atol=1e-6)
    x, t = torch.randn(SHAPE), torch.tensor([5, 900])
    cond, null = {"emb": torch.tensor([0.7, -1.3])}, {"emb": torch.tensor(0.0)}
    c, u = cond_model(x, t, **cond), cond_model(x, t, emb=torch.zeros(2))
    assert torch.allclose(guided_prediction(cond_model, x, t, cond, null, 3.0, guidance_rescale=0.7),
                          rescale_guidance(u + 3.0 * (c - u), c, 0.7), atol=1e-6)
    with pytest.raises(ConfigError, match="guidance_rescale"):
        sample(cond_model, DDIMScheduler(), SHAPE, cond=cond, null_cond=null, guidance_scale=3.0,
               guidance_rescale=1.5, num_inference_steps=2, progress=False)


def test_sample_loop_equals_a_hand_written_loop(capsys):
    cond, null = {"emb": torch.tensor([0.5, 0.1])}, {"emb": torch.tensor([0.0])}
    got = sample(cond_model, DDIMScheduler(), SHAPE, cond=cond, null_cond=null, guidance_scale=2.0,
                 num_inference_steps=6, generator=torch.Generator().manual_seed(0), progress=True)
    assert "denoising" in capsys.readouterr().err  # the progress bar
    s = DDIMScheduler()
    s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        tt = torch.full((2,), int(t))
        c, u = cond_model(x, tt, **cond), cond_model(x, tt, emb=torch.zeros(2))
        x = s.step(u + 2.0 * (c - u), t, x).prev_sample
    assert torch.allclose(got, x, atol=1e-6)
    with pytest.raises(ConfigError, match="null_cond"):
        sample(cond_model, DDIMScheduler(), SHAPE, cond=cond, guidance_scale=2.0, num_inference_steps=2, progress=False)


def test_drop_condition():
    B = 400
    cond = {"emb": torch.arange(1.0, B + 1), "mask": torch.ones(B, 3)}
    null = {"emb": torch.tensor(0.0), "mask": torch.tensor([1.0, 0.0, 0.0])}
    assert torch.equal(drop_condition(cond, null, 0.0)["emb"], cond["emb"])
    all_null = drop_condition(cond, null, 1.0)
    assert torch.equal(all_null["emb"], torch.zeros(B)) and torch.equal(all_null["mask"], null["mask"].expand(B, 3))
    half = drop_condition(cond, null, 0.3, generator=torch.Generator().manual_seed(0))
    dropped = half["emb"] == 0
    assert 0.22 < float(dropped.float().mean()) < 0.38
    assert torch.equal(half["mask"][:, 1] == 0, dropped)  # a row's entries are dropped together
    assert torch.equal(half["emb"][~dropped], cond["emb"][~dropped])
    with pytest.raises(ConfigError):
        drop_condition(cond, null, 1.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_is_zero_for_the_true_target(prediction_type):
    s = DDPMScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.tensor([10, 700])
    oracle = lambda xt, tt: s.training_target(x0, noise, tt)  # noqa: E731
    assert float(diffusion_loss(oracle, s, x0, timesteps=t, noise=noise)) == 0.0
    zero = lambda xt, tt: torch.zeros_like(xt)  # noqa: E731
    want = float((s.training_target(x0, noise, t) ** 2).mean())
    assert abs(float(diffusion_loss(zero, s, x0, timesteps=t, noise=noise)) - want) < 1e-6
    # sampled t and noise: seeded, so reproducible
    a = diffusion_loss(fake_model, s, x0, generator=torch.Generator().manual_seed(1))
    assert float(a) == float(diffusion_loss(fake_model, s, x0, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_by_hand(prediction_type):
    """Min-SNR-gamma: each sample's MSE times min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), or itself (x_0),
    with SNR = abar / (1 - abar) written out from the betas; the top of the cosine schedule (SNR ~ 0) stays finite."""
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    t = torch.tensor([3, 400, 999])
    abar = torch.cumprod(1 - s.betas.double(), 0)[t]
    snr = abar / (1 - abar)
    assert torch.allclose(s.snr(t).double(), snr, rtol=1e-3)  # the scheduler keeps abar in fp32: 1 - abar near 0 rounds
    by_hand = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    by_hand = {"epsilon": by_hand / snr, "v_prediction": by_hand / (snr + 1), "sample": by_hand}[prediction_type]
    w = s.min_snr_weight(t, 5.0)
    assert torch.isfinite(w).all() and torch.allclose(w.double(), by_hand, rtol=1e-3, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((3, *SHAPE[1:]), generator=g), torch.randn((3, *SHAPE[1:]), generator=g)
    zero = lambda xt, tt: torch.zeros_like(xt)  # noqa: E731
    per_sample = (s.training_target(x0, noise, t) ** 2).flatten(1).mean(1)
    want = float((w * per_sample).mean())
    assert abs(float(diffusion_loss(zero, s, x0, timesteps=t, noise=noise, snr_gamma=5.0)) - want) < 1e-6
    with pytest.raises(ConfigError, match="snr_gamma"):
        s.min_snr_weight(t, 0.0)


def test_the_unet_trains_and_samples_in_the_core():
    """The U-Net is a denoiser as the core expects it: model(x_t, t, encoder_hidden_states=...)."""
    from allformers.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, block_channels=(16, 32), norm_groups=8, attention_heads=2,
                           cross_attention_dim=8, layers_per_block=1))
    sched = DDPMScheduler(num_train_timesteps=50)
    g = torch.Generator().manual_seed(0)
    x0, ctx, null = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, generator=g), torch.zeros(3, 8)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        cond = drop_condition({"encoder_hidden_states": ctx}, {"encoder_hidden_states": null}, 0.2, generator=g)
        loss = diffusion_loss(unet, sched, x0, cond, timesteps=torch.tensor([10, 20, 30, 40]),
                              noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    unet.eval()
    kw = dict(cond={"encoder_hidden_states": ctx[:2]}, null_cond={"encoder_hidden_states": null}, num_inference_steps=4,
              progress=False)
    guided = sample(unet, DDIMScheduler(num_train_timesteps=50), (2, 3, 8, 8), guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(5), **kw)
    plain = sample(unet, DDIMScheduler(num_train_timesteps=50), (2, 3, 8, 8), guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(5), **kw)
    assert guided.shape == (2, 3, 8, 8) and torch.isfinite(guided).all() and not torch.allclose(guided, plain)
