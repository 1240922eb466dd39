"""Text to image: DALL-E (loss weights by hand, row/column positions, cached sampling = recomputation), the
diffusion pipelines of GLIDE / latent diffusion / Imagen (frozen T5 stays bit-identical, token-level
condition dropout, guidance 1 = the conditional model, super-resolution with noise augmentation, save/load),
the caption judge, the recipes' pieces and `allformers imagine`."""
import dataclasses
import math

import pytest
import torch

import allformers
from allformers.config import Config
from allformers.data.synthetic_shapes import SyntheticShapes, all_captions, canonical_of
from allformers.diffusion import DDIMScheduler, DDPMScheduler, sample
from allformers.errors import ConfigError
from allformers.models.autoencoders import AutoencoderConfig
from allformers.models.dalle import DALLE, DALLEConfig
from allformers.models.shapes_judge import (FIELDS, IGNORE, JudgeConfig, ShapesJudge, caption_of_fields, fields_tensor,
                                            scene_fields)
from allformers.models.text_to_image import TextToImage, TextToImageConfig
from allformers.models.unet import UNetConfig
from allformers.tokenization import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dalle(**kw):
    vq = AutoencoderConfig(kind="vq", block_channels=(8, 16), norm_groups=8, num_codes=16, code_dim=8, latent_channels=8,
                           mid_attention=False)
    base = dict(text_vocab_size=20, text_length=5, image_vocab_size=16, grid=3, n_layer=2, n_head=2, n_embd=32,
                autoencoder=vq)
    torch.manual_seed(0)
    return DALLE(DALLEConfig(**{**base, **kw})).eval()


# ---------------------------------------------------------------------- DALL-E
def test_dalle_loss_weights_by_hand():
    m = tiny_dalle()
    text, image = torch.randint(0, 20, (2, 5)), torch.randint(0, 16, (2, 3, 3))
    with torch.no_grad():  # every weight 0: all logits are 0, each kind uniform over its own vocabulary
        for p in m.transformer.parameters():
            p.zero_()
    with torch.no_grad():
        loss, parts = m.loss(text, image, return_parts=True)
    assert parts["text_loss"] == pytest.approx(math.log(20), abs=1e-5)  # text predicts among the 20 caption ids
    assert parts["image_loss"] == pytest.approx(math.log(16), abs=1e-5)  # image among the 16 codes only
    assert float(loss) == pytest.approx(math.log(20) / 8 + 7 * math.log(16) / 8, abs=1e-5)

    m = tiny_dalle()  # a random model: the weighting is of the two per-kind means
    text_logits, image_logits = m(text, image)
    lt = -text_logits.log_softmax(-1).gather(-1, text[..., None]).mean()
    li = -image_logits.log_softmax(-1).gather(-1, image.flatten(1)[..., None]).mean()
    assert m.loss(text, image).item() == pytest.approx((lt / 8 + 7 * li / 8).item(), abs=1e-5)
    half = tiny_dalle(text_loss_weight=0.5)
    assert half.loss(text, image).item() == pytest.approx(((lt + li) / 2).item(), abs=1e-5)


def test_dalle_sequence_and_row_column_positions():
    m = tiny_dalle()
    c = m.config
    text, image = torch.randint(0, 20, (2, 5)), torch.randint(0, 16, (2, 3, 3))
    ids = m.inputs(text, image)
    assert ids.shape == (2, 1 + 5 + 9) and (ids[:, 0] == c.bos_id).all()
    assert torch.equal(ids[:, 1:6], text) and torch.equal(ids[:, 6:] - c.text_vocab_size, image.flatten(1))
    pos = m.positions(1 + 5 + 9)
    assert torch.equal(pos[:6], m.text_pos.weight)
    for r in range(3):
        for col in range(3):  # the image code of cell (r, col): its row's embedding plus its column's
            assert torch.equal(pos[6 + 3 * r + col], m.row_pos.weight[r] + m.col_pos.weight[col])
    text_logits, image_logits = m(text, image)
    assert text_logits.shape == (2, 5, 20) and image_logits.shape == (2, 9, 16)
    with pytest.raises(ConfigError, match="text_length"):
        m(text[:, :4], image)


def test_dalle_cached_sampling_equals_recomputation_and_decodes():
    m = tiny_dalle()
    text = torch.randint(0, 20, (3, 5))
    codes = m.generate_codes(text, temperature=0).flatten(1)  # greedy through the KV cache
    for k in range(9):  # the same choice from a full forward pass over the codes so far
        _, logits = m(text, torch.cat([codes[:, :k], torch.zeros(3, 9 - k, dtype=torch.long)], 1))
        assert torch.equal(logits[:, k].argmax(-1), codes[:, k])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = m.generate_codes(text, temperature=1.0, top_k=4, generator=g1)
    assert torch.equal(a, m.generate_codes(text, temperature=1.0, top_k=4, generator=g2))
    pictures = m.generate(text, temperature=0.7, top_k=2, generator=g1)
    assert pictures.shape == (3, 3, 6, 6) and 0 <= float(pictures.min()) and float(pictures.max()) <= 1


def test_dalle_save_load_and_config_errors(tmp_path):
    m = tiny_dalle()
    m.save(tmp_path / "dalle")
    again = allformers.load(tmp_path / "dalle")
    assert type(again).__name__ == "DALLE" and again.config == m.config
    text = torch.randint(0, 20, (2, 5))
    assert torch.equal(again.generate_codes(text, temperature=0), m.generate_codes(text, temperature=0))
    with pytest.raises(ConfigError, match="image_vocab_size"):
        DALLEConfig(image_vocab_size=32, autoencoder=AutoencoderConfig(kind="vq", num_codes=16, norm_groups=8,
                                                                       block_channels=(8,)))
    with pytest.raises(ConfigError, match="'vq' or 'dvae'"):
        DALLEConfig(autoencoder=AutoencoderConfig(kind="kl", norm_groups=8, block_channels=(8,)))


# ---------------------------------------------------------------------- the diffusion pipelines
def word_tokenizer():
    return Tokenizer.word_level(all_captions(canonical=False))


def tiny_pipeline(tok, *, freeze=False, super_res=False, latent=False, encoder=None, coords=False, **kw):
    te = encoder or Config(vocab_size=tok.vocab_size, block_size=12, n_layer=1, n_head=2, n_embd=16, causal=False,
                           lm_head=False)
    ch = 4 if latent else 3
    unet = UNetConfig(in_channels=ch + 2 * coords, out_channels=ch, block_channels=(8, 16), norm_groups=8,
                      down_blocks=("res", "cross"),
                      up_blocks=("cross", "res"), mid_block="cross", attention_heads=2, cross_attention_dim=te.n_embd,
                      layers_per_block=1, class_embed_dim=te.n_embd)
    sr = UNetConfig(in_channels=6, out_channels=3, block_channels=(8, 8), norm_groups=8, down_blocks=("res", "res"),
                    up_blocks=("res", "res"), mid_block="res", layers_per_block=1, class_embed_dim=8) if super_res else None
    ae = AutoencoderConfig(kind="kl", block_channels=(8, 16), norm_groups=8, latent_channels=4,
                           mid_attention=False) if latent else None
    cfg = TextToImageConfig(text_encoder=te, unet=unet, image_size=16, text_length=12, pad_id=tok.pad_id,
                            eos_id=tok.eos_id, pooled_text=True, freeze_text_encoder=freeze, super_res=sr,
                            coordinate_channels=coords,
                            autoencoder=ae, scheduler={"class_name": "DDPMScheduler", "num_train_timesteps": 100,
                                                       "beta_schedule": "squaredcos_cap_v2"}, **kw)
    torch.manual_seed(0)
    return TextToImage(cfg)


def batch_of(tok, n=4, size=16):
    data = SyntheticShapes(n, image_size=size)
    b = data.batch(range(n))
    ids, mask = tok.encode_padded(b["captions"], 12)
    return {"input_ids": ids, "attention_mask": mask, "images": b["images"] * 2 - 1}


def test_frozen_t5_stays_bit_identical_while_the_unet_trains():
    from allformers.recipes.seq2seq import build
    from allformers.recipes.text_to_image import TensorBatches, frozen_t5_encoder, render_shapes, train_diffusion
    from allformers.training.trainer import TrainConfig

    tok = word_tokenizer()
    t5 = build("t5", tok, n_layer=1, n_decoder_layer=1, n_embd=16, n_head=2, head_dim=8, intermediate_size=32,
               block_size=32)
    enc_config, enc_state = frozen_t5_encoder(t5)
    model = tiny_pipeline(tok, freeze=True, encoder=enc_config)
    model.text_encoder.load_state_dict(enc_state)
    frozen = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    unet = {k: v.clone() for k, v in model.unet.state_dict().items()}
    data = render_shapes(8, "train", 0, sizes=(16,))
    train_diffusion(model, tok, data, TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, lr=1e-2, log_interval=1,
                                                  eval_interval=0, eval_at_start=False, checkpoint=False),
                    progress=False)
    assert all(torch.equal(v, frozen[k]) for k, v in model.text_encoder.state_dict().items())  # bit for bit
    assert any(not torch.equal(v, unet[k]) for k, v in model.unet.state_dict().items())  # while the U-Net learned
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert isinstance(TensorBatches({"x": torch.zeros(3)}).sample(2)["x"], torch.Tensor)


def test_condition_dropout_replaces_captions_by_the_empty_one():
    tok = word_tokenizer()
    model = tiny_pipeline(tok, condition_dropout=1.0)
    b = batch_of(tok)
    ids, mask = model.drop_captions(b["input_ids"], b["attention_mask"])
    assert (ids[:, 0] == tok.eos_id).all() and (ids[:, 1:] == tok.pad_id).all()
    assert mask.sum(1).tolist() == [1] * 4
    model.config.condition_dropout = 0.0
    ids, mask = model.drop_captions(b["input_ids"], b["attention_mask"])
    assert torch.equal(ids, b["input_ids"]) and torch.equal(mask, b["attention_mask"])
    null = model.null_condition()  # the empty caption, read by the text encoder
    assert null["encoder_hidden_states"].shape == (1, 12, 16) and null["class_labels"].shape == (1, 16)


def test_guidance_one_is_the_conditional_model_and_thresholding_reaches_the_sampler():
    tok = word_tokenizer()
    model = tiny_pipeline(tok).eval()
    b = batch_of(tok, 2)
    out = model.generate(b["input_ids"], b["attention_mask"], guidance_scale=1.0, num_inference_steps=4,
                         generator=torch.Generator().manual_seed(0), progress=False)
    cond = model.encode_text(b["input_ids"], b["attention_mask"])
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    by_hand = sample(model.unet, sched, (2, 3, 16, 16), cond=cond, num_inference_steps=4,
                     generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(out, ((by_hand.clamp(-1, 1) + 1) / 2), atol=1e-6)
    guided = model.generate(b["input_ids"], b["attention_mask"], guidance_scale=3.0, num_inference_steps=4,
                            generator=torch.Generator().manual_seed(0), progress=False)
    assert not torch.allclose(out, guided)
    assert model.sampler(model.scheduler, thresholding=True).thresholding
    assert model.sampler(model.scheduler).prediction_type == model.scheduler.prediction_type


def test_thresholded_sampling_rederives_the_noise_from_the_thresholded_x0():
    """A thresholding pipeline's DDIM step takes its noise estimate from the thresholded x_0 unless told
    otherwise (both halves of the step then agree); plain clipping keeps diffusers' default."""
    tok = word_tokenizer()
    model = tiny_pipeline(tok).eval()
    b = batch_of(tok, 2)
    run = lambda **kw: model.generate(b["input_ids"], b["attention_mask"], guidance_scale=3.0,  # noqa: E731
                                      num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                                      progress=False, **kw)
    assert model.sampler(model.scheduler).clip_sample and torch.equal(run(), run(use_clipped_model_output=False))
    assert not torch.allclose(run(), run(use_clipped_model_output=True))
    cond, null = model.encode_text(b["input_ids"], b["attention_mask"]), model.null_condition()
    sched = model.sampler(model.scheduler, thresholding=True)
    by_hand = lambda flag: sample(model.unet, sched, (2, 3, 16, 16), cond=cond, null_cond=null,  # noqa: E731
                                  guidance_scale=3.0, num_inference_steps=4, progress=False,
                                  generator=torch.Generator().manual_seed(0), use_clipped_model_output=flag)
    default, old = run(thresholding=True), run(thresholding=True, use_clipped_model_output=False)
    assert torch.allclose(default, (by_hand(True).clamp(-1, 1) + 1) / 2, atol=1e-6)
    assert torch.allclose(old, (by_hand(False).clamp(-1, 1) + 1) / 2, atol=1e-6)
    assert not torch.allclose(default, old)
    with pytest.raises(ConfigError, match="DDIM option"):
        sample(model.unet, DDPMScheduler(num_train_timesteps=100), (1, 3, 16, 16), num_inference_steps=2,
               progress=False, use_clipped_model_output=True)


def test_super_resolution_stage_and_noise_augmentation(tmp_path):
    tok = word_tokenizer()
    model = tiny_pipeline(tok, super_res=True)
    b = batch_of(tok)
    low = b["images"]
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    t = torch.tensor([0, 10, 50, 99])  # q(z_t | upsampled low-res): Imagen's noise-conditioning augmentation
    noise = torch.randn(up.shape, generator=torch.Generator().manual_seed(1))
    abar = model.sr_scheduler.alphas_cumprod[t].view(4, 1, 1, 1)
    aug = model.augment_low_res(low, t, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(aug, abar ** 0.5 * up + (1 - abar) ** 0.5 * noise, atol=1e-6)
    sr_batch = {"images": torch.rand(4, 3, 32, 32) * 2 - 1, "low_res": low}
    loss = model.super_res_loss(sr_batch)
    loss.backward()
    assert model.super_res.conv_in.weight.grad is not None and model.unet.conv_in.weight.grad is None
    high, base = model.generate(b["input_ids"][:2], b["attention_mask"][:2], num_inference_steps=2, progress=False,
                                return_low_res=True, generator=torch.Generator().manual_seed(0))
    assert high.shape == (2, 3, 32, 32) and base.shape == (2, 3, 16, 16)
    model.save(tmp_path / "imagen", tokenizer=tok)
    again = allformers.load(tmp_path / "imagen")
    assert again.tokenizer.vocab_size == tok.vocab_size
    high2 = again.generate(b["input_ids"][:2], b["attention_mask"][:2], num_inference_steps=2, progress=False,
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(high, high2, atol=1e-6)


def test_latent_pipeline_trains_on_precomputed_posteriors():
    tok = word_tokenizer()
    model = tiny_pipeline(tok, latent=True)
    b = batch_of(tok)
    post = model.vae.encode(b["images"])
    stats = {**b, "latent_mean": post.mean.detach(), "latent_std": torch.zeros_like(post.std)}
    z = model.latents_of(stats)
    assert torch.allclose(z, post.mean * model.vae.config.scaling_factor, atol=1e-6)
    assert model.config.latent_shape == (4, 8, 8)
    loss = model.loss(stats)
    loss.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    out = model.generate(b["input_ids"][:1], b["attention_mask"][:1], num_inference_steps=2, progress=False)
    assert out.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("latent", [False, True])
def test_coordinate_channels_sit_beside_x_t(latent):
    """CoordConv: the base U-Net reads x_t with an x channel (-1 at the left, +1 at the right) and a y
    channel (-1 at the top) beside it, in training and sampling; the U-Net needs the 2 extra inputs."""
    tok = word_tokenizer()
    model = tiny_pipeline(tok, latent=latent, coords=True).eval()
    b = batch_of(tok, 2)
    x, t = torch.randn(2, *model.config.latent_shape), torch.tensor([3, 70])
    cond = model.encode_text(b["input_ids"], b["attention_mask"])
    side = model.config.latent_shape[-1]
    ramp = torch.tensor([-1 + 2 * i / (side - 1) for i in range(side)])
    xs, ys = ramp[None, :].expand(side, side), ramp[:, None].expand(side, side)
    by_hand = model.unet(torch.cat([x, torch.stack([xs, ys])[None].expand(2, 2, side, side)], 1), t, **cond)
    assert torch.allclose(model.denoiser(x, t, **cond), by_hand, atol=1e-6)
    assert model.unet.config.in_channels == model.config.latent_shape[0] + 2
    assert torch.isfinite(model.loss(b))
    out = model.generate(b["input_ids"], b["attention_mask"], num_inference_steps=2, progress=False)
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="coordinate channels"):
        dataclasses.replace(model.config, unet=tiny_pipeline(tok, latent=latent).config.unet)


def test_standardized_text_states_of_a_frozen_encoder(tmp_path):
    """standardize_text: after set_text_statistics, the states of those captions' real tokens have mean 0
    and std 1 per feature; the statistics are saved with the weights; a trainable encoder can't have them."""
    tok = word_tokenizer()
    model = tiny_pipeline(tok, freeze=True, standardize_text=True).eval()
    captions = all_captions()[:200]
    ids, mask = tok.encode_padded(captions, 12)
    raw = model.text_encoder(ids, attention_mask=mask, return_hidden=True)[mask.bool()]  # (tokens, D)
    mean, std = model.set_text_statistics(ids, mask, batch_size=64)
    assert torch.allclose(mean, raw.mean(0), atol=1e-5) and torch.allclose(std, raw.std(0), atol=1e-5)
    states = model.encode_text(ids, mask)["encoder_hidden_states"][mask.bool()]
    assert torch.allclose(states.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(states.std(0), torch.ones(16), atol=1e-4)
    model.save(tmp_path / "std", tokenizer=tok)
    again = allformers.load(tmp_path / "std")
    assert torch.equal(again.text_mean, mean) and torch.equal(again.text_std, std)
    with pytest.raises(ConfigError, match="freeze_text_encoder"):
        tiny_pipeline(tok, standardize_text=True)
    with pytest.raises(ConfigError, match="standardize_text=True"):
        tiny_pipeline(tok).set_text_statistics(ids, mask)


def test_pipeline_config_errors():
    tok = word_tokenizer()
    good = tiny_pipeline(tok).config
    te = good.text_encoder
    with pytest.raises(ConfigError, match="bidirectional"):
        TextToImageConfig(text_encoder=te.replace(causal=True), unet=good.unet)
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        TextToImageConfig(text_encoder=te.replace(n_embd=32, n_head=2), unet=good.unet)
    with pytest.raises(ConfigError, match="class_embed_dim"):
        TextToImageConfig(text_encoder=te, unet=dataclasses.replace(good.unet, class_embed_dim=None), pooled_text=True)
    with pytest.raises(ConfigError, match="KL autoencoder"):
        TextToImageConfig(text_encoder=te, unet=good.unet, autoencoder=AutoencoderConfig(kind="vq", norm_groups=8,
                                                                                         block_channels=(8,)))
    with pytest.raises(ConfigError, match="snr_gamma"):
        TextToImageConfig(text_encoder=te, unet=good.unet, snr_gamma=0.0)
    with pytest.raises(ConfigError, match="must be 3 -> 3"):
        TextToImageConfig(text_encoder=te, unet=dataclasses.replace(good.unet, in_channels=4))
    with pytest.raises(ConfigError, match="downsampling"):
        dataclasses.replace(tiny_pipeline(tok, latent=True).config, image_size=17)
    again = TextToImageConfig.from_dict(good.to_dict())  # nested configs round-trip through JSON
    assert again == good


def test_snr_gamma_reaches_both_stages_losses():
    """TextToImageConfig.snr_gamma weights the base and the super-res loss: on the same draws (seeded
    generator), each equals diffusion_loss with snr_gamma on its own denoiser, and differs from the unweighted one."""
    from allformers.diffusion import diffusion_loss

    tok = word_tokenizer()
    model = tiny_pipeline(tok, super_res=True, snr_gamma=1.0, condition_dropout=0.0)
    b = batch_of(tok)
    hi = {"images": batch_of(tok, size=32)["images"], "low_res": b["images"]}
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    weighted, sr_weighted = model.loss(b, generator=g()), model.super_res_loss(hi, generator=g())
    cond = model.encode_text(b["input_ids"], b["attention_mask"])
    by_core = diffusion_loss(model.unet, model.scheduler, b["images"], cond, generator=g(), snr_gamma=1.0)
    assert torch.allclose(weighted, by_core)
    model.config.snr_gamma = None
    assert not torch.allclose(weighted, model.loss(b, generator=g()))
    assert not torch.allclose(sr_weighted, model.super_res_loss(hi, generator=g()))


# ---------------------------------------------------------------------- the judge
def test_scene_fields_spell_the_canonical_caption():
    data = SyntheticShapes(300, split="train", seed=3)
    for i in range(len(data)):
        s = data[i]
        f = scene_fields(s)
        assert caption_of_fields(f) == s.canonical == canonical_of(s.caption)
        used = {k for k, v in f.items() if v != IGNORE}
        assert used == {"kind", "colour_a", "shape_a"} | ({"relation", "colour_b", "shape_b"} if s.kind == "pair" else
                                                          {"count"} if s.kind == "count" else set())


def test_judge_reads_fields_and_scores_matches():
    judge = ShapesJudge(JudgeConfig(channels=(8, 8), hidden=16)).eval()
    scenes = [SyntheticShapes(6, seed=1)[i] for i in range(6)]
    images = torch.rand(6, 3, 16, 16)  # resized to 32 inside
    logits = judge(images)
    assert {k: v.shape for k, v in logits.items()} == {k: (6, len(v)) for k, v in FIELDS.items()}
    loss = judge.loss(images, fields_tensor(scenes))
    loss.backward()
    assert loss.item() > 0
    targets = fields_tensor(scenes)  # a judge whose heads output the true fields reads every caption right

    def oracle(_):
        return {k: torch.nn.functional.one_hot(targets[k].clamp(min=0), len(FIELDS[k])).float() for k in FIELDS}

    judge.forward = oracle
    assert judge.read(images) == [s.canonical for s in scenes]
    assert judge.accuracy(images, [s.caption for s in scenes]) == 1.0
    with pytest.raises(ConfigError, match="divisible"):
        JudgeConfig(image_size=30, channels=(8, 8, 8))


# ---------------------------------------------------------------------- recipes' pieces and the CLI
def test_word_tokenizer_and_padding():
    tok = word_tokenizer()
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids, mask = tok.encode_padded(["a red circle below a blue square", "two red squares"], 6)
    assert ids[0].tolist()[-1] == tok.eos_id and mask[0].tolist() == [1] * 6  # cut, EOS kept
    assert tok.decode(ids[1]) == "two red squares" and mask[1].tolist() == [1, 1, 1, 1, 0, 0]


def test_workbench_pieces():
    from allformers.recipes.text_to_image import (autoencoder_config, caption_match, latent_scaling, reconstruction,
                                                   render_shapes, revive_codes)
    from allformers.models.autoencoders import build_autoencoder

    d = render_shapes(6, "train", 0, sizes=(32, 16))
    assert d.images[32].shape == (6, 3, 32, 32) and d.images[16].shape == (6, 3, 16, 16) and d.images[32].dtype == torch.uint8
    vq = build_autoencoder(autoencoder_config("vq", block_channels=(8, 8, 8), num_codes=32, code_dim=4))
    moved = revive_codes(vq, d.images[32].float() / 127.5 - 1, torch.Generator().manual_seed(0))
    assert 0 < moved <= 32
    r = reconstruction(vq, d.images[32])
    assert r["mse"] > 0 and 1 <= r["codes_used"] <= 32
    assert latent_scaling(None, torch.randn(1000) * 4) == pytest.approx(0.25, rel=0.1)
    judge = ShapesJudge(JudgeConfig(channels=(8, 8), hidden=8))
    scenes = [SyntheticShapes(4, "test")[i] for i in range(4)]
    out = caption_match(lambda caps: torch.rand(len(caps), 3, 16, 16), judge, scenes, batch_size=3)
    assert out["n"] == 4 and 0 <= out["accuracy"] <= 1 and out["images"].shape == (4, 3, 16, 16)


def test_weighted_rows_and_the_pair_share():
    from allformers.recipes.text_to_image import TensorBatches, TextToImageError, kind_weights

    rows = TensorBatches({"x": torch.arange(4)}, weights=torch.tensor([0, 1, 0, 3]))  # integers are fine
    drawn = rows.sample(400)["x"]
    assert set(drawn.tolist()) == {1, 3} and 240 < (drawn == 3).sum() < 360  # 3 : 1, give or take
    with pytest.raises(TextToImageError, match="non-negative"):
        TensorBatches({"x": torch.arange(4)}, weights=torch.ones(3))
    scenes = [SyntheticShapes(60, "train")[i] for i in range(60)]
    w = kind_weights(scenes, 0.6)
    pair = torch.tensor([s.kind == "pair" for s in scenes])
    assert w[pair].sum().item() == pytest.approx(0.6) and w[~pair].sum().item() == pytest.approx(0.4)
    assert kind_weights(scenes, None) is None
    with pytest.raises(TextToImageError, match="between 0 and 1"):
        kind_weights(scenes, 1.0)


def test_imagine_cli(tmp_path):
    from allformers.cli.main import main

    tok = word_tokenizer()
    tiny_pipeline(tok).save(tmp_path / "glide", tokenizer=tok)
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    assert main(["imagine", "a red circle", "--model", str(tmp_path / "glide"), "--steps", "2", "-o", str(one),
                 "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(one).size == (128, 128)  # 16 x 16, enlarged 8 times
    assert main(["imagine", "a red circle", "two blue squares", "--model", str(tmp_path / "glide"), "--steps", "2",
                 "--samples", "2", "-o", str(grid), "--no-progress"]) == 0
    assert grid.exists()
    assert main(["imagine", "a red circle", "--model", str(tmp_path / "glide"), "--steps", "2",
                 "--guidance-rescale", "0.7", "-o", str(one), "--no-progress"]) == 0
    assert main(["imagine", "a red circle", "--model", str(tmp_path / "glide"), "--steps", "2",
                 "--guidance-rescale", "2", "-o", str(one), "--no-progress"]) == 2  # out of [0, 1]
    assert main(["imagine", "a red circle", "--model", "glide-shapes-nope", "-o", str(one)]) == 2
    assert main(["imagine", "--model", str(tmp_path / "glide")]) == 2  # no caption


@pytest.mark.slow
def test_quick_recipe_runs_end_to_end(tmp_path):
    from allformers.recipes import run_recipe

    r = run_recipe("dalle-shapes", out=tmp_path / "dalle", overrides={"quick": True}, progress=False, verbose=False)
    assert (tmp_path / "dalle" / "summary.json").exists() and (tmp_path / "dalle" / "judge" / "config.json").exists()
    assert 0 <= r["report"]["heldout"]["accuracy"] <= 1
    seen = r["report"]["heldout"]["seen"]  # new pictures of training captions, scored the same way
    assert seen["n"] == 8 and 0 <= seen["accuracy"] <= 1 and "images" not in seen
    model = allformers.load(tmp_path / "dalle")
    assert type(model).__name__ == "DALLE" and model.tokenizer is not None


def test_recipe_settings_reach_the_pipeline_and_the_reconstruction_ceiling(tmp_path):
    """--set prediction_type / snr_gamma change the trained pipeline's schedule and loss; the autoencoder's
    report carries the judge's caption match on its reconstructions of the held-out drawings."""
    from allformers.recipes import run_recipe
    from allformers.recipes.text_to_image import DIFFUSION_CHOICES, Workbench, quick_settings

    bench = Workbench(quick_settings(), progress=False, log=lambda m: None)
    assert bench.schedule("ldm")["prediction_type"] == "epsilon"
    assert bench.schedule("glide")["prediction_type"] == "v_prediction"
    heldout = {p.canonical for p in bench.prompts}  # the seen prompts are training captions, none held out
    assert bench.seen_prompts and not heldout & {p.canonical for p in bench.seen_prompts}
    forced = Workbench(quick_settings().replace(prediction_type="sample", coordinate_channels=True), progress=False,
                       log=lambda m: None)
    assert {forced.schedule(s)["prediction_type"] for s in DIFFUSION_CHOICES} == {"sample"}
    assert all(forced.choice(s, "coordinate_channels") for s in DIFFUSION_CHOICES)
    assert forced.glide_config().unet.in_channels == 5 and forced.glide_config().coordinate_channels
    r = run_recipe("ldm-shapes", out=tmp_path / "ldm", progress=False, verbose=False,
                   overrides={"quick": True, "prediction_type": "v_prediction", "snr_gamma": 0})
    model = allformers.load(tmp_path / "ldm")
    assert model.config.scheduler["prediction_type"] == "v_prediction" and model.config.snr_gamma is None
    assert not model.config.scheduler["clip_sample"]
    assert 0 <= r["report"]["autoencoder"]["caption_match_reconstructed"] <= 1


# ---------------------------------------------------------------------- the caption parser
def test_caption_parser_reads_captions_and_ignores_the_fields_a_kind_lacks():
    from allformers.models.shapes_judge import CaptionParser

    tok = word_tokenizer()
    enc = Config(vocab_size=tok.vocab_size, block_size=12, n_layer=1, n_head=2, n_embd=16, causal=False, lm_head=False)
    torch.manual_seed(0)
    parser = CaptionParser(enc)
    data = SyntheticShapes(40, "train", seed=3)
    singles = [data[i] for i in range(40) if data[i].kind == "single"][:4]
    ids, mask = tok.encode_padded([s.caption for s in singles], 12)
    parser.loss(ids, mask, fields_tensor(singles)).backward()
    for name in ("relation", "colour_b", "shape_b", "count"):  # a single shape has none of these
        grad = parser.heads[name].weight.grad
        assert grad is None or grad.abs().sum() == 0, name
    assert parser.heads["colour_a"].weight.grad.abs().sum() > 0
    logits = parser(ids, mask)
    by_hand = [caption_of_fields({k: int(logits[k][j].argmax()) for k in FIELDS}) for j in range(len(singles))]
    assert parser.read(ids, mask) == by_hand and parser.training  # read() leaves the mode as it was
    with pytest.raises(ConfigError, match="bidirectional"):
        CaptionParser(dataclasses.replace(enc, causal=True))


def test_caption_parser_pretraining_learns_the_roles_of_held_out_captions():
    """A short pretraining on training captions reads captions it never saw (the test split's), pairs
    included: "a blue square below a red circle" is read with the red circle first."""
    from allformers.recipes.text_to_image import (PARSER_TRAIN, caption_tokenizer, heldout_scenes, render_shapes,
                                                   text_encoder_config, train_caption_parser)

    tok = caption_tokenizer()
    data = render_shapes(2000, "train", 0, sizes=(16,))
    heldout = heldout_scenes(60, seed=5)
    enc = text_encoder_config(tok.vocab_size, n_layer=2, n_embd=32, n_head=2)
    parser, report = train_caption_parser(tok, data, enc, PARSER_TRAIN.replace(max_steps=600, batch_size=128,
                                                                                 warmup_steps=20, log_interval=100),
                                          heldout=heldout, progress=False)
    assert report["params"] == parser.num_params() and report["final_loss"] < 0.5, report
    assert report["heldout_parse_accuracy"] >= 0.8, report  # chance is far below 1%
    assert not {s.canonical for s in heldout} & {s.canonical for s in data.scenes}


def test_latent_diffusion_parsed_encoder_is_frozen_pooled_and_switchable():
    from allformers.recipes.text_to_image import TextToImageError, Workbench, quick_settings

    bench = Workbench(quick_settings(), progress=False, log=lambda m: None)
    model, report = bench.ldm()
    parser, parser_report = bench.caption_parser()
    assert report["caption_encoder"] == "parsed" and report["caption_parser"] is parser_report
    assert model.config.freeze_text_encoder and model.config.pooled_text
    assert model.config.unet.class_embed_dim == model.config.text_encoder.n_embd
    for name, p in model.text_encoder.state_dict().items():  # bit-identical to the parser's after the U-Net trained
        assert torch.equal(p, parser.encoder.state_dict()[name]), name
    joint, joint_report = bench.ldm(caption_encoder="joint")
    assert joint_report["caption_encoder"] == "joint" and not joint.config.freeze_text_encoder
    assert not joint.config.pooled_text
    assert bench.glide_config().pooled_text and not bench.glide_config().freeze_text_encoder  # GLIDE's own: joint
    parsed_glide = Workbench(quick_settings().replace(caption_encoder="parsed"), progress=False, log=lambda m: None)
    assert parsed_glide.glide_config().freeze_text_encoder
    with pytest.raises(TextToImageError, match="caption_encoder='clip'"):
        bench.ldm(caption_encoder="clip")
