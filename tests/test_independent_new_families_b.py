"""An independent check of the SANA and Wan families, written apart from the project's tiny builders
and conformance helpers: every model, tokenizer and stock pipeline is built here from diffusers /
transformers / tokenizers classes directly, and softrepa is used only through its public API
(`SoftTokens`, `SoftTokensConfig`, `attach`, `SoftrepaError`).

Per model: the tokens change the output; a backward pass gives gradients to the tokens and to nothing
else; `remove()` restores the output, the state-dict keys and values, every hook dict of every module
and the attention processors bit for bit; a layer count beyond the model's depth is a softrepa error;
the stock pipeline with tokens differs from, and after `remove()` equals exactly, its output before any
attach (both CFG branches; for Wan 2.2 A14B both experts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach

WORDS = "a an the red blue green small large circle square triangle on left right of and".split()


def word_tokenizer(bos: bool):
    """A word-level fast tokenizer (pad 0, eos 1, bos 2, unk 3), BOS prepended for Gemma-style encoders."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<bos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    else:
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<bos>", model_max_length=8192)


def sana_pipeline():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = word_tokenizer(bos=True)
    torch.manual_seed(11)
    te = Gemma2Model(Gemma2Config(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=12,
                                  query_pre_attn_scalar=12)).eval()
    torch.manual_seed(12)
    vae = AutoencoderDC(latent_channels=8, attention_head_dim=4, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                        decoder_qkv_multiscales=((), ()), scaling_factor=0.5).eval()
    torch.manual_seed(13)
    model = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=3, attention_head_dim=8,
                                   num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=12,
                                   cross_attention_dim=24, caption_channels=24, sample_size=16).eval()
    return SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=model,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0))


def wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=8,
                                 out_channels=8, text_dim=20, freq_dim=16, ffn_dim=32, num_layers=3).eval()


def wan_pipeline(two_experts: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(21)
    te = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=20, d_kv=10, d_ff=40, num_layers=1, num_heads=2)).eval()
    torch.manual_seed(22)
    vae = AutoencoderKLWan(base_dim=8, z_dim=8, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_temporal=2,
                           scale_factor_spatial=2).eval()
    return WanPipeline(tokenizer=word_tokenizer(bos=False), text_encoder=te, vae=vae, transformer=wan_transformer(23),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer_2=wan_transformer(24) if two_experts else None,
                       boundary_ratio=0.5 if two_experts else None)


CASES = {
    "sana": (sana_pipeline, dict(use_resolution_binning=False, max_sequence_length=12)),
    "wan": (lambda: wan_pipeline(False), dict(num_frames=3, max_sequence_length=12)),
    "wan-a14b": (lambda: wan_pipeline(True), dict(num_frames=3, max_sequence_length=12)),
}


def model_inputs(name, model):
    """Direct transformer inputs (batch 2, timesteps 130 and 720)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([130.0, 720.0])
    if name == "sana":
        return dict(hidden_states=torch.randn(2, 8, 4, 4, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
                    encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    return dict(hidden_states=torch.randn(2, 8, 2, 4, 4, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(2, 5, 20, generator=g))


def big_tokens(pipe, **cfg):
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_tokens=3, num_layers=2, **cfg), seed=3)
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
    return tokens


def state(pipe):
    """Everything remove() must restore: hooks of every module, processors, state dict (keys, values)."""
    out = {}
    for cname in ("transformer", "transformer_2"):
        model = getattr(pipe, cname, None)
        if model is None:
            continue
        out[cname] = (
            [(n, {k: list(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)})
             for n, m in model.named_modules()],
            {k: id(p) for k, p in model.attn_processors.items()},
            {k: v.clone() for k, v in model.state_dict().items()},
        )
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], f"{name}: hooks differ"
        assert a[name][1] == b[name][1], f"{name}: processors differ"
        assert list(a[name][2]) == list(b[name][2]), f"{name}: state-dict keys differ"
        assert all(torch.equal(a[name][2][k], b[name][2][k]) for k in a[name][2]), f"{name}: weights differ"


@pytest.mark.parametrize("name", list(CASES))
def test_model_level_properties(name):
    pipe = CASES[name][0]()
    models = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    inputs = model_inputs(name, pipe.transformer)
    with torch.no_grad():
        plain = [m(**inputs, return_dict=False)[0] for m in models]
    before = state(pipe)
    tokens = big_tokens(pipe)

    handle = attach(pipe, tokens)
    with torch.no_grad():
        for m, p in zip(models, plain):  # every denoiser of the pipeline carries the tokens
            assert (m(**inputs, return_dict=False)[0] - p).abs().max() > 1e-3
    for m in models:
        m.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    loss = sum(m(**inputs, return_dict=False)[0].square().mean() for m in models)
    loss.backward()
    assert tokens.base.grad is not None and tokens.base.grad.abs().sum() > 0
    assert tokens.time.grad is not None and tokens.time.grad.abs().sum() > 0
    for m in models + [pipe.vae, pipe.text_encoder]:
        assert all(p.grad is None for p in m.parameters())
    handle.remove()

    with torch.no_grad():
        for m, p in zip(models, plain):
            assert torch.equal(m(**inputs, return_dict=False)[0], p)
    for m in models:
        m.requires_grad_(True)  # as it was before
    assert_same_state(before, state(pipe))

    depth = len(pipe.transformer.transformer_blocks if name == "sana" else pipe.transformer.blocks)
    with pytest.raises(softrepa.SoftrepaError):
        SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=depth + 1))
    with pytest.raises(softrepa.SoftrepaError):
        SoftTokens.for_model(pipe, SoftTokensConfig(layers=(depth,)))


@pytest.mark.parametrize("name", list(CASES))
def test_stock_pipeline_with_tokens_then_exactly_vanilla(name):
    build, kw = CASES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)

    def run():
        out = pipe(prompt=["a red circle", "a small blue square on the left"], negative_prompt=["", "green"],
                   height=32, width=32, num_inference_steps=3, guidance_scale=4.0, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kw)
        return out.images if name == "sana" else out.frames

    never = run()
    before = state(pipe)
    handle = attach(pipe, big_tokens(pipe))
    with_tokens = run()
    handle.remove()
    after = run()
    assert np.abs(with_tokens - never).max() > 1e-4
    assert np.array_equal(after, never)
    assert_same_state(before, state(pipe))
