"""Image autoencoders: the KL VAE and the VQ model against diffusers' AutoencoderKL / VQModel both ways; the KL
terms, the straight-through gradients and the commitment loss by hand; DALL-E's dVAE (Gumbel-softmax codes)."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import allformers
from allformers.blocks.conv import ImageShapeError
from allformers.errors import CheckpointError, ConfigError
from allformers.models.autoencoders import (AutoencoderConfig, AutoencoderKL, DiagonalGaussian, DiscreteVAE,
                                            VectorQuantizer, VQAutoencoder, build_autoencoder, gumbel_softmax,
                                            kl_to_uniform)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def images(B=2, size=16, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def jitter(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kw", [dict(latent_channels=4), dict(latent_channels=2, layers_per_block=2,
                                                                 mid_block_add_attention=False, use_quant_conv=False,
                                                                 block_out_channels=(16, 16, 32),
                                                                 down_block_types=("DownEncoderBlock2D",) * 3,
                                                                 up_block_types=("UpDecoderBlock2D",) * 3)],
                         ids=["default", "no-attention-no-quant-conv"])
def test_autoencoder_kl_parity_both_ways(kw, tmp_path):
    torch.manual_seed(0)
    ref = jitter(diffusers.AutoencoderKL(**{**TINY, **kw}))
    ref.save_pretrained(tmp_path / "theirs")
    ours = allformers.load(tmp_path / "theirs")
    assert isinstance(ours, AutoencoderKL)
    x = images()
    with torch.no_grad():
        pa, pb = ref.encode(x).latent_dist, ours.encode(x)
        assert (pa.mean - pb.mean).abs().max() <= 1e-4 and (pa.logvar - pb.logvar).abs().max() <= 1e-4
        assert (pa.kl() - pb.kl()).abs().max() <= 1e-3  # a sum over the latent
        want = ref(x).sample
        assert (ours(x) - want).abs().max() <= 1e-4
        ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert (ref(x, sample_posterior=True, generator=ga).sample -
                ours(x, sample_posterior=True, generator=gb)).abs().max() <= 1e-4
        z = torch.randn(2, ours.config.latent_channels, 4, 4)
        assert (ref.decode(z).sample - ours.decode(z)).abs().max() <= 1e-4
    ours.save(tmp_path / "ours", format="diffusers")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x).sample - want).abs().max() <= 1e-4
    ours.save(tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(allformers.load(tmp_path / "native")(x), ours(x))


def test_vq_parity_both_ways(tmp_path):
    torch.manual_seed(0)
    ref = jitter(diffusers.VQModel(**TINY, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=5))
    ref.save_pretrained(tmp_path / "theirs")
    ours = allformers.load(tmp_path / "theirs")
    assert isinstance(ours, VQAutoencoder)
    x = images()
    with torch.no_grad():
        want = ref(x).sample
        assert (ours(x) - want).abs().max() <= 1e-4
        h = ref.encode(x).latents
        assert (ours.encode(x) - h).abs().max() <= 1e-4
        zq, loss, (_, _, ids) = ref.quantize(h)
        q = ours.quantize(h)
        assert torch.equal(q.ids.flatten(), ids.flatten()) and q.ids.unique().numel() > 1
        assert (q.quantized - zq).abs().max() <= 1e-6 and abs(float(q.loss) - float(loss)) <= 1e-6
        assert (ours.decode_ids(q.ids) - want).abs().max() <= 1e-4  # decoding the ids is decoding the latents
    ours.save(tmp_path / "ours", format="diffusers")
    back = diffusers.VQModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x).sample - want).abs().max() <= 1e-4


def test_old_attention_names_load(tmp_path):
    """Older checkpoints name the middle attention query/key/value/proj_attn."""
    torch.manual_seed(0)
    ref = jitter(diffusers.AutoencoderKL(**TINY, latent_channels=4))
    ref.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in load_file(str(f)).items():
        for new, o in renames.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        old[k] = v
    save_file(old, str(f))
    x = images()
    with torch.no_grad():
        assert (allformers.load(tmp_path / "m")(x) - ref(x).sample).abs().max() <= 1e-4


def test_diagonal_gaussian_kl_by_hand():
    # one latent element per image: mean m, logvar l -> KL = 0.5 (m^2 + e^l - 1 - l)
    params = torch.tensor([[0.0, 0.0], [1.0, math.log(4.0)]]).reshape(2, 2, 1, 1)
    q = DiagonalGaussian(params)
    assert torch.allclose(q.kl(), torch.tensor([0.0, 0.5 * (1 + 4 - 1 - math.log(4.0))]))
    other = DiagonalGaussian(torch.tensor([[0.5, math.log(2.0)]] * 2).reshape(2, 2, 1, 1))
    # KL(N(1, 4) || N(0.5, 2)) = 0.5 ((1 - 0.5)^2 / 2 + 4 / 2 - 1 - log 4 + log 2)
    assert abs(float(q.kl(other)[1]) - 0.5 * (0.25 / 2 + 2 - 1 - math.log(4) + math.log(2))) < 1e-6
    # nll of the mean: 0.5 (log 2 pi + logvar)
    assert abs(float(q.nll(q.mean)[1]) - 0.5 * (math.log(2 * math.pi) + math.log(4.0))) < 1e-6
    # sampling is reparameterised: the gradient reaches mean and log-variance
    p = params.clone().requires_grad_()
    DiagonalGaussian(p).sample(torch.Generator().manual_seed(0)).sum().backward()
    assert torch.equal(p.grad[:, 0], torch.ones(2, 1, 1)) and p.grad[:, 1].abs().sum() > 0
    assert torch.equal(DiagonalGaussian(params, deterministic=True).kl(), torch.zeros(2))


def test_vq_straight_through_and_loss_gradients():
    vq = VectorQuantizer(num_codes=4, dim=2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).T.reshape(1, 2, 1, 2).requires_grad_()  # cells (0.9, 0.1), (0.2, 0.8)
    out = vq(z)
    assert out.ids.tolist() == [[[1, 2]]]
    assert torch.equal(out.quantized.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2))
    # straight through: d(quantized)/dz is the identity
    w = torch.randn(1, 2, 1, 2)
    (g,) = torch.autograd.grad((out.quantized * w).sum(), z, retain_graph=True)
    assert torch.equal(g, w)
    # loss = (1 + beta) * mse by value; the encoder gets only beta * the commitment gradient
    mse = ((torch.tensor([[1.0, 0.0], [0.0, 1.0]]) - torch.tensor([[0.9, 0.2], [0.1, 0.8]])) ** 2).mean()
    assert abs(float(out.loss.detach()) - 1.25 * float(mse)) < 1e-6
    (gz, ge) = torch.autograd.grad(out.loss, (z, vq.embedding.weight))
    zq = out.quantized.detach()
    assert torch.allclose(gz, 0.25 * 2 * (z - zq).detach() / z.numel())
    assert torch.allclose(ge[1], 2 * (torch.tensor([1.0, 0.0]) - torch.tensor([0.9, 0.2])) / z.numel())
    assert torch.equal(ge[0], torch.zeros(2))  # unused codes get no gradient


# ---------------------------------------------------------------------- DALL-E's dVAE
def dvae(**kw):
    torch.manual_seed(0)
    return DiscreteVAE(AutoencoderConfig(kind="dvae", block_channels=(16, 32), norm_groups=8, num_codes=12,
                                         code_dim=6, **kw)).eval()


def test_dvae_shapes_codes_and_ids():
    model = dvae()
    x = images(B=3, size=16)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (3, 12, 8, 8) and out.codes.shape == (3, 12, 8, 8) and out.sample.shape == x.shape
    assert torch.allclose(out.codes.sum(1), torch.ones(3, 8, 8), atol=1e-5)  # a distribution per cell
    ids = model.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.long and int(ids.max()) < 12
    # decoding ids = decoding their one-hot codes
    one_hot = torch.nn.functional.one_hot(ids, 12).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.allclose(model.decode(ids), model.decode_codes(one_hot), atol=1e-5)
    with pytest.raises(ImageShapeError, match="multiples of 2"):
        model.logits(torch.rand(1, 3, 15, 15))


def test_gumbel_softmax_hard_is_one_hot_forward_with_the_soft_gradient():
    logits = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    soft = gumbel_softmax(logits, 0.7, hard=False, generator=torch.Generator().manual_seed(1))
    hard = gumbel_softmax(logits, 0.7, hard=True, generator=torch.Generator().manual_seed(1))
    assert soft.shape == hard.shape == logits.shape
    assert torch.allclose(hard.detach(), torch.nn.functional.one_hot(soft.argmax(1), 5).permute(0, 3, 1, 2).float(),
                          atol=1e-6)
    w = torch.randn(logits.shape)
    (g_soft,) = torch.autograd.grad((soft * w).sum(), logits)
    (g_hard,) = torch.autograd.grad((hard * w).sum(), logits)
    assert torch.allclose(g_hard, g_soft, atol=1e-6) and g_hard.abs().sum() > 0
    # a low temperature sharpens the soft sample towards the hard one
    cold = gumbel_softmax(logits.detach(), 0.01, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(cold, hard.detach(), atol=1e-3)


def test_kl_to_uniform_by_hand():
    K = 4
    uniform = torch.zeros(1, K, 2, 2)
    assert float(kl_to_uniform(uniform)) == pytest.approx(0.0, abs=1e-6)
    # q = softmax([log 3, 0, 0, 0]) = (1/2, 1/6, 1/6, 1/6): KL = sum q log(q K) per cell, 4 cells
    logits = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0]).reshape(1, K, 1, 1).expand(1, K, 2, 2)
    q = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert float(kl_to_uniform(logits)) == pytest.approx(4 * float((q * torch.log(q * K)).sum()), abs=1e-6)
    # a certain choice costs log K per cell
    assert float(kl_to_uniform(torch.tensor([50.0, 0, 0, 0]).reshape(1, K, 1, 1))) == pytest.approx(math.log(K), abs=1e-4)


def test_dvae_loss_trains_and_round_trips(tmp_path):
    model = dvae(temperature=0.9, straight_through=True).train()
    x = images(B=2, size=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(15):
        loss, parts = model.loss(x, kl_weight=0.1, generator=torch.Generator().manual_seed(step))
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first and set(parts) == {"mse", "kl"}
    model.eval().save(tmp_path / "dvae")
    again = allformers.load(tmp_path / "dvae")
    assert isinstance(again, DiscreteVAE) and again.config.straight_through
    assert torch.equal(again.encode(x), model.encode(x))
    with pytest.raises(CheckpointError, match="diffusers class"):
        model.save(tmp_path / "d", format="diffusers")


def test_kl_and_vq_losses_and_latents():
    for kind in ("kl", "vq"):
        model = build_autoencoder(AutoencoderConfig(kind=kind, block_channels=(16, 32), norm_groups=8, num_codes=8))
        loss, parts = model.loss(images())
        loss.backward()
        assert loss > 0 and parts["mse"] > 0 and all(p.grad is not None for p in model.encoder.parameters())
    vae = build_autoencoder(AutoencoderConfig(block_channels=(16, 32), norm_groups=8, scaling_factor=0.5,
                                              shift_factor=0.1)).eval()
    x = images()
    with torch.no_grad():
        z = vae.to_latents(x, sample=False)
        assert torch.allclose(z, (vae.encode(x).mode() - 0.1) * 0.5)
        assert torch.allclose(vae.from_latents(z), vae(x), atol=1e-5)


def test_autoencoder_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        AutoencoderConfig(kind="vqgan")
    with pytest.raises(ConfigError, match="norm_groups"):
        AutoencoderConfig(block_channels=(20,), norm_groups=8)
    with pytest.raises(ConfigError, match="temperature"):
        AutoencoderConfig(kind="dvae", temperature=0)
