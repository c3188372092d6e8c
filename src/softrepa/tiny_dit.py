"""Tiny diffusers pipelines of the newer single-stream DiT families, built from configs (no download).

As `softrepa.tiny`: random weights, tokenizers from vocabularies generated in memory, ordinary
diffusers / transformers objects that `save_pretrained` and the stock `from_pretrained` round-trip.
Here: Z-Image (`ZImagePipeline`), Qwen-Image 2.1 (`QwenImage21Pipeline`) and FLUX.3
(`Flux3ModularPipeline`); the last two in memory only: their Qwen3-VL processor cannot be saved and
loaded back without torchvision here.
"""

from __future__ import annotations

import torch

from .tiny import make_qwen2_tokenizer, tiny_flux2_vae, tiny_vae

#: A Qwen3-style chat template (user turn, assistant prompt, the `enable_thinking` switch the Z-Image
#: pipeline passes), short enough that the prompt fits the tiny text lengths of the tests.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined "
    "and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def make_qwen3_chat_tokenizer(model_max_length: int = 512):
    """The byte-level Qwen tokenizer of `softrepa.tiny` with the Qwen3 chat template and think tokens.

    Args:
        model_max_length: the tokenizer's maximum length (pipelines truncate at their own).

    Example:
        >>> tok = make_qwen3_chat_tokenizer()
        >>> tok.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
        ...                         add_generation_prompt=True)
    """
    tok = make_qwen2_tokenizer(model_max_length=model_max_length)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def tiny_zimage_pipeline(*, num_layers: int = 3, seed: int = 0):
    """A complete tiny `ZImagePipeline` (random weights, built in well under a second).

    Args:
        num_layers: main single-stream blocks (the ones tokens enter).
        seed: weights seed.

    Text encoder: a 3-layer, width-16 `Qwen3Model` (the pipeline reads its second-to-last hidden state:
    text width 16); tokenizer: `make_qwen3_chat_tokenizer`. VAE: a factor-2 `AutoencoderKL` with 4
    latent channels and a non-trivial scaling / shift. Transformer: width 32 (2 heads x 16, rotary axes
    4 + 6 + 6), one noise and one context refiner, `num_layers` main single-stream blocks, 2 x 2 patches;
    its learned pad tokens (zero at init) are drawn at random, so that the caption's padding to a
    multiple of 32 matters as in a trained model. Scheduler: Z-Image-Turbo's (static shift 3).
    Sides must be multiples of 4.

    Example:
        >>> pipe = tiny_zimage_pipeline()
        >>> image = pipe("a red circle", height=32, width=32, num_inference_steps=2).images[0]
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = make_qwen3_chat_tokenizer()
    torch.manual_seed(seed + 1)
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                max_position_embeddings=1024, pad_token_id=0)).eval()
    vae = tiny_vae(latent_channels=4, seed=seed + 4, scaling_factor=0.6, shift_factor=0.1)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=num_layers, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[512, 64, 64]).eval()
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)


#: The content-list chat template a Qwen3-VL processor renders (text parts only: the tiny builds have no
#: video processor, see `make_qwen3vl_processor`).
QWEN3VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_VISION_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def make_qwen3vl_processor():
    """A `Qwen3VLProcessor` over the byte-level Qwen tokenizer (plus the vision tokens) and the PIL
    `Qwen2VLImageProcessorPil`, built without any download.

    transformers' `ProcessorMixin.__init__` insists on a video processor, and every video processor
    needs torchvision, which does not import beside the CPU torch build here (docs: environment facts).
    The processor is therefore assembled with the attributes its `__init__` would set and no video
    processor: text-to-image prompts and still condition images never reach one. Such a processor is
    not saved by `save_pretrained` in a form `from_pretrained` loads without torchvision, so the tiny
    Qwen-Image 2.1 pipeline is built in memory (no CLI round trip through a saved folder here).

    Example:
        >>> proc = make_qwen3vl_processor()
        >>> ids = proc(text=["<|im_start|>user\na red circle<|im_end|>\n"], return_tensors="pt").input_ids
    """
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_qwen2_tokenizer(model_max_length=4096)
    tok.add_tokens(list(_VISION_TOKENS.values()), special_tokens=True)
    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor = Qwen2VLImageProcessorPil(), tok, None
    proc.chat_template = QWEN3VL_CHAT_TEMPLATE
    for name, token in _VISION_TOKENS.items():
        setattr(proc, name, token)
        setattr(proc, f"{name}_id", tok.convert_tokens_to_ids(token))
    return proc


def tiny_qwen3vl_text_encoder(proc, *, hidden: int, layers: int, mrope: tuple[int, int, int], seed: int):
    """A `Qwen3VLForConditionalGeneration` for `proc` (`make_qwen3vl_processor`): a `layers`-layer, `hidden`-wide
    language model (2 heads of hidden / 2, interleaved multimodal rotary sections `mrope` summing to a quarter
    of hidden) and a one-block vision tower text-to-image calls never run; drawn after `torch.manual_seed(seed)`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {f"{name}_id": getattr(proc, f"{name}_id") for name in _VISION_TOKENS}
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(proc.tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         pad_token_id=0,
                         rope_scaling={"rope_type": "default", "mrope_section": list(mrope), "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=hidden,
                           deepstack_visual_indexes=[]),
        **ids)
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_qwenimage21_pipeline(*, num_layers: int = 3, seed: int = 0):
    """A complete tiny `QwenImage21Pipeline` (random weights).

    Args:
        num_layers: block-causal single-stream blocks.
        seed: weights seed.

    Text encoder: a `Qwen3VLForConditionalGeneration` with a 2-layer, width-32 language model
    (interleaved multimodal rotary sections 2 + 3 + 3 = head_dim / 2) and a one-block vision tower the
    text-to-image call never runs; processor: `make_qwen3vl_processor`. VAE: an `AutoencoderKLQwenImage21`
    with the pipeline's fixed spatial factor 16 (four halvings), 4 latent channels, RGB in and out
    (the released one is RGBA: the backbone handles both), non-trivial latent statistics. Transformer:
    width 32 (2 heads x 16, rotary axes 4 + 6 + 6), `num_layers` block-causal single-stream blocks,
    `causal_condition` on (the pipeline then uses its prefix KV cache). Scheduler: dynamic shifting
    (the pipeline computes mu). Sides must be multiples of 32.

    Example:
        >>> pipe = tiny_qwenimage21_pipeline()
        >>> image = pipe("a red circle", height=32, width=32, num_inference_steps=2).images[0]
    """
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    proc = make_qwen3vl_processor()
    text_encoder = tiny_qwen3vl_text_encoder(proc, hidden=32, layers=2, mrope=(2, 3, 3), seed=seed + 1)
    torch.manual_seed(seed + 4)
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False] * 4, in_channels=3, out_channels=3,
                                   latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 2.5]).eval()
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(in_channels=4, out_channels=4, num_layers=num_layers,
                                                attention_head_dim=16, num_attention_heads=2, context_in_dim=32,
                                                axes_dims_rope=(4, 6, 6)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=1.0, base_shift=0.5, max_shift=0.9)
    return QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=proc,
                               transformer=transformer)


def tiny_flux3_pipeline(*, distilled: bool = False, num_layers: int = 1, num_single_layers: int = 3, seed: int = 0):
    """A complete tiny `Flux3ModularPipeline` (random weights), built from diffusers' own `Flux3AutoBlocks`
    without the prompt upsampler (softrepa encodes prompts as written: `softrepa.pipeline.PROMPT_REWRITERS`).

    Args:
        distilled: the step-distilled flow-map model (`flow_map=True`) in `Flux3DistilledModularPipeline`
            (no guider: sampled without CFG).
        num_layers: per-mode blocks (per token mode).
        num_single_layers: joint single-stream blocks (the ones tokens enter).
        seed: weights seed.

    Text encoder: a `Qwen3VLForConditionalGeneration` with a 32-layer, width-16 language model (the
    pipeline stacks hidden layers 4, 8, ..., 32: text width 128) and a one-block vision tower the
    text-to-image call never runs; processor: `make_qwen3vl_processor` (in memory only, as for Qwen-Image
    2.1). VAE: FLUX.2's factor-2 `AutoencoderKLFlux2` with non-trivial latent batch-norm statistics.
    Transformer: width 32 (2 heads x 16, rotary axes 4 x 4), 2 x 2 packed patches (16 channels).
    Scheduler: the pipeline's constant shift 6.93. Sides must be multiples of 4.

    Example:
        >>> pipe = tiny_flux3_pipeline()
        >>> image = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, output="images")[0]
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor

    proc = make_qwen3vl_processor()
    text_encoder = tiny_qwen3vl_text_encoder(proc, hidden=16, layers=32, mrope=(1, 1, 2), seed=seed + 1)
    vae = tiny_flux2_vae(seed + 4)
    torch.manual_seed(seed)
    transformer = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=num_layers,
                                          num_single_layers=num_single_layers, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=8 * 16, timestep_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), flow_map=distilled).eval()
    blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler", None)
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=proc,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93),
                           image_processor=Flux3ImageProcessor(vae_scale_factor=4, vae_latent_channels=4))
    return pipe


__all__ = ["make_qwen3_chat_tokenizer", "make_qwen3vl_processor", "tiny_flux3_pipeline", "tiny_qwen3vl_text_encoder",
           "tiny_qwenimage21_pipeline", "tiny_zimage_pipeline"]
