"""An independent check of the new families of issue 24 part A, written apart from the project's own
builders and suites: each tiny random model and stock pipeline is assembled here with diffusers and
transformers directly (no `softrepa.tiny*`, no tests/conformance.py), and only softrepa's public API
(`SoftTokens`, `SoftTokensConfig`, `attach`, `SoftrepaError`) is used. For every family:

* tokens change the denoiser's output;
* a loss through the model sends gradients to the tokens only (no model parameter gets one);
* `remove()` restores the output, the state dict (keys and values), every hook dict of every module
  and the attention processors, bit for bit;
* a layer count beyond the model's depth is a softrepa error;
* the stock pipeline with tokens gives other images, and after `remove()` exactly the images of a
  pipeline that never carried tokens.
FLUX.3's stock pipeline is the modular `Flux3ModularPipeline` (no classic class): it is assembled from
diffusers' `Flux3AutoBlocks` and called the modular way, one prompt per call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach

RES = 32


# ----------------------------------------------------------------------------- builders (diffusers directly)
def _byte_tokenizer(specials: list[str]):
    """A byte-level BPE tokenizer with no merges (every byte one token) and the given special tokens,
    wrapped as a transformers fast tokenizer; built in memory, nothing read from the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=1024)
    tok.add_tokens(specials, special_tokens=True)
    return tok


def build_zimage():
    """ZImagePipeline: Qwen3 text encoder, AutoencoderKL, ZImageTransformer2DModel (4 main layers)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(11)
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=12, pad_token_id=0)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.5, shift_factor=0.05).eval()
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=48, n_layers=4,
                                  n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=24, axes_dims=[4, 6, 6],
                                  axes_lens=[512, 32, 32]).eval()
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                          tokenizer=tok, transformer=tr)


def zimage_model_call(pipe, seed=0):
    """The denoiser's own call as the pipeline makes it (per-sample lists, t = 1 - sigma)."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config
    x = [torch.randn(c.in_channels, 1, 8, 8, generator=g) for _ in range(2)]
    caps = [torch.randn(n, c.cap_feat_dim, generator=g) for n in (6, 37)]
    t = torch.tensor([0.3, 0.8])

    def call():
        return torch.stack(pipe.transformer(x, t, caps, return_dict=False)[0])  # (B, C, 1, h, w)

    return call


def build_qwenimage21():
    """QwenImage21Pipeline: Qwen3-VL text encoder and processor, the 16x AutoencoderKLQwenImage21 (RGB here),
    QwenImage21Transformer2DModel (5 block-causal blocks, causal_condition: the pipeline uses its KV cache)."""
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>", *vision.values()])
    # every transformers video processor needs torchvision, absent here: the processor gets the attributes
    # its __init__ sets, without one (text-to-image never calls it)
    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor = Qwen2VLImageProcessorPil(), tok, None
    proc.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                          "{{ c['text'] }}{% endfor %}<|im_end|>\n{% endfor %}")
    for name, token in vision.items():
        setattr(proc, name, token)
        setattr(proc, name + "_id", tok.convert_tokens_to_ids(token))
    torch.manual_seed(12)
    te = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=12, pad_token_id=0,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=1, out_hidden_size=24,
                           deepstack_visual_indexes=[]),
        **{name + "_id": getattr(proc, name + "_id") for name in vision})).eval()
    vae = AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=4, z_dim=8, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False] * 4, in_channels=3, out_channels=3,
                                   latents_mean=[0.0] * 8, latents_std=[1.3] * 8).eval()
    tr = QwenImage21Transformer2DModel(in_channels=8, out_channels=8, num_layers=5, attention_head_dim=8,
                                       num_attention_heads=3, context_in_dim=24, axes_dims_rope=(2, 2, 4)).eval()
    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                               text_encoder=te, processor=proc, transformer=tr)


def qwenimage21_model_call(pipe, seed=0):
    """The denoiser's call as the pipeline's first step makes it: [text (sample 0 padded), 2 x 4 target]."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    slots = torch.cat([torch.zeros(2, 9, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)], dim=1)
    kw = dict(hidden_states=torch.randn(2, 8, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(2, 9, c.context_in_dim, generator=g), encoder_hidden_states_mask=mask,
              timestep=torch.tensor([0.2, 0.7]), img_shapes=[[(1, 2, 4)]] * 2, img_mask=slots)

    def call():
        return pipe.transformer(**kw, return_dict=False)[0]

    return call


def build_flux3():
    """Flux3ModularPipeline from Flux3AutoBlocks without the prompt upsampler (an LLM the text-to-image check
    does not need): Qwen3-VL text encoder (16 layers: the text step stacks layers 4, 8, 12, 16) and processor,
    FLUX.2's AutoencoderKLFlux2, Flux3Transformer2DModel (1 per-mode block, 4 joint blocks)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines import Flux3AutoBlocks

    pipe21 = build_qwenimage21()  # its processor (same Qwen3-VL kind; no torchvision needed)
    proc = pipe21.processor
    torch.manual_seed(13)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    te = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(vocab_size=len(proc.tokenizer), hidden_size=12, intermediate_size=24, num_hidden_layers=16,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=6, pad_token_id=0,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=1, out_hidden_size=12,
                           deepstack_visual_indexes=[]),
        **{name: getattr(proc, name) for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")})).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), latent_channels=2, layers_per_block=1, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    tr = Flux3Transformer2DModel(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=4,
                                 attention_head_dim=8, num_attention_heads=3, joint_attention_dim=4 * 12,
                                 timestep_channels=16, axes_dims_rope=(2, 2, 2, 2)).eval()
    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=tr, vae=vae, text_encoder=te, tokenizer=proc,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93))
    return pipe


def flux3_model_call(pipe, seed=0):
    """The denoiser's call as the modular pipeline's denoise step makes it: packed latents, text ids (0,0,0,l)."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config
    n = 7
    txt_ids = torch.zeros(n, 4)
    txt_ids[:, 3] = torch.arange(n)
    hh, ww = torch.meshgrid(torch.arange(2.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(8), hh.flatten() * 0.5, ww.flatten() * 0.5, torch.zeros(8)], dim=1)
    kw = dict(hidden_states=torch.randn(2, 8, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(2, n, c.joint_attention_dim, generator=g),
              timestep=torch.tensor([0.2, 0.7]), img_ids=img_ids, txt_ids=txt_ids)

    def call():
        return pipe.transformer(**kw, return_dict=False)[0]

    return call


def _images_modular(pipe, kw):
    """The modular pipeline takes one prompt per call; the CFG scale is its guider's."""
    pipe.guider.guidance_scale = kw["guidance_scale"]
    out = [pipe(prompt=p, height=RES, width=RES, num_inference_steps=2, output_type="np", output="images",
                text_encoder_out_layers=(4, 8, 12, 16), generator=torch.Generator().manual_seed(s))[0]
           for p, s in (("a red circle", 0), ("two small blue squares on the left", 1))]
    return np.stack(out)


FAMILIES = {
    "zimage": (build_zimage, zimage_model_call, {"guidance_scale": 2.5, "max_sequence_length": 48}, 4),
    "qwenimage21": (build_qwenimage21, qwenimage21_model_call,
                    {"true_cfg_scale": 2.5, "negative_prompt": ["", "blurry"]}, 5),
    "flux3": (build_flux3, flux3_model_call, {"guidance_scale": 2.5}, 4),
}


# ----------------------------------------------------------------------------- helpers
def _tokens(pipe, layers=2):
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_tokens=3, num_layers=layers), seed=1)
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_(0.0, 2.0)  # far above float noise
    return tokens


def _module_state(model: torch.nn.Module) -> dict:
    """Everything attaching may touch on a model: per module its hook dicts, the state dict, processors."""
    hooks = [(name, {k: list(v.items()) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)})
             for name, m in model.named_modules()]
    procs = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    return {"hooks": hooks, "state": {k: v.clone() for k, v in model.state_dict().items()}, "procs": procs}


def _images(pipe, kw):
    if type(pipe).__name__ == "Flux3ModularPipeline":
        return _images_modular(pipe, kw)
    return pipe(prompt=["a red circle", "two small blue squares on the left"], height=RES, width=RES,
                num_inference_steps=2, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kw).images


# ----------------------------------------------------------------------------- the checks
@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tokens_change_the_output_and_remove_restores_everything(name):
    build, model_call, _, _ = FAMILIES[name]
    pipe = build()
    call = model_call(pipe)
    model = pipe.transformer
    with torch.no_grad():
        plain = call()
        before = _module_state(model)
        handle = attach(pipe, _tokens(pipe))
        with_tokens = call()
        handle.remove()
        after_out = call()
    assert (with_tokens - plain).abs().max() > 1e-3
    assert torch.equal(after_out, plain)
    after = _module_state(model)
    assert after["hooks"] == before["hooks"]
    assert list(after["state"]) == list(before["state"])
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["procs"].keys() == before["procs"].keys()
    assert all(after["procs"][k] is v for k, v in before["procs"].items())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradients_reach_only_the_tokens(name):
    build, model_call, _, _ = FAMILIES[name]
    pipe = build()
    model = pipe.transformer
    model.requires_grad_(False)
    tokens = _tokens(pipe)
    with attach(pipe, tokens):
        model_call(pipe)().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokens.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_layer_count_beyond_the_model_is_a_softrepa_error(name):
    build, _, _, depth = FAMILIES[name]
    pipe = build()
    with pytest.raises(softrepa.SoftrepaError):
        SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=depth + 1))
    SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=depth))  # the whole depth is fine


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stock_pipeline_differs_with_tokens_and_equals_a_never_attached_one_after_remove(name):
    build, _, kw, _ = FAMILIES[name]
    never = build()  # same seeds: the same weights, never touched by softrepa
    pipe = build()
    for p in (never, pipe):
        p.set_progress_bar_config(disable=True)  # a modular pipeline: its top-level blocks only
    reference = _images(never, kw)
    handle = attach(pipe, _tokens(pipe))
    with_tokens = _images(pipe, kw)
    handle.remove()
    after = _images(pipe, kw)
    assert np.abs(with_tokens - reference).max() > 1e-4
    assert np.array_equal(after, reference)
