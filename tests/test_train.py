"""The training code of iteris_demo.train and demo_model: targets for epsilon and v prediction, the caption probe."""

import pytest
import torch
from diffusers import DDIMScheduler

from iteris_demo import shapes
from iteris_demo.train import encode, noised


def _scheduler(**kw):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


def test_epsilon_target_is_the_noise_that_made_x_t():
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    sched = _scheduler()
    xt, t, target = noised(x0, sched, torch.Generator().manual_seed(0))
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * target, atol=1e-6)


def test_v_target_recovers_the_clean_picture_and_matches_diffusers():
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    sched = _scheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    gen = torch.Generator().manual_seed(0)
    xt, t, v = noised(x0, sched, gen)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)  # x0 = sqrt(a) x_t - sqrt(1-a) v
    eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-5)


def test_an_unsupported_prediction_type_is_refused_by_name():
    with pytest.raises(ValueError, match="sample"):
        noised(torch.zeros(1, 3, 4, 4), _scheduler(prediction_type="sample"), torch.Generator())


def test_encode_pads_to_the_text_encoders_positions_when_the_tokenizer_has_no_length():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from iteris_demo.tiny import tiny_tokenizer

    tok = CLIPTokenizer(vocab=tiny_tokenizer().get_vocab(), merges=[])  # model_max_length: 1e30
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=20)).eval()
    with torch.no_grad():
        hidden = encode(te, tok, ["a photo", "zwx style"])
    assert hidden.shape == (2, 20, 8)


def test_caption_probe_pulls_a_text_encoders_shape_and_position_words_apart():
    from iteris_demo.check import text_separation
    from iteris_demo.model import CaptionProbe, new_base_model
    from iteris_demo.train import encode

    _, te, tok, _ = new_base_model(seed=1)
    scenes = [shapes.random_scene(torch.Generator().manual_seed(k)) for k in range(8)]
    before = text_separation(te, tok, scenes)
    probe = CaptionProbe(te.config.hidden_size)
    opt = torch.optim.Adam([*te.parameters(), *probe.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        prompts = shapes.batch(gen, 32)[1]
        loss = probe(prompts, encode(te, tok, prompts))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = text_separation(te.eval(), tok, scenes)
    assert losses[-1] < 0.5 * losses[0], losses
    for field in ("shape", "position"):
        assert after[field] > 2 * before[field], (before, after)
