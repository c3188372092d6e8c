"""Tiny diffusers pipelines of the newer single-stream DiT families, built from configs (no download).

As `softrepa.tiny`: random weights, tokenizers from vocabularies generated in memory, ordinary
diffusers / transformers objects that `save_pretrained` and the stock `from_pretrained` round-trip.
Here: Z-Image (`ZImagePipeline`) and Qwen-Image 2.1 (`QwenImage21Pipeline`).
"""

from __future__ import annotations

import torch

from .tiny import make_qwen2_tokenizer, tiny_vae

#: A Qwen3-style chat template (user turn, assistant prompt, the `enable_thinking` switch the Z-Image
#: pipeline passes), short enough that the prompt fits the tiny text lengths of the tests.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined "
    "and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def make_qwen3_chat_tokenizer(model_max_length: int = 512):
    """The byte-level Qwen tokenizer of `softrepa.tiny` with the Qwen3 chat template and think tokens."""
    tok = make_qwen2_tokenizer(model_max_length=model_max_length)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def tiny_zimage_pipeline(*, num_layers: int = 3, seed: int = 0):
    """A complete tiny `ZImagePipeline` (random weights, built in well under a second).

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


__all__ = ["make_qwen3_chat_tokenizer", "tiny_zimage_pipeline"]
