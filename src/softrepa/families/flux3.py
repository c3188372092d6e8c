"""FLUX.3 (`Flux3Transformer2DModel`; `Flux3ModularPipeline`, `Flux3DistilledModularPipeline`): Algorithm 1
on the joint blocks.

The model. Three token modes — the noisy image, optional reference images, the text — first pass
through their own per-mode blocks (each mode attends within itself only), then the text and the
image modes are concatenated, text first, for the joint `single_transformer_blocks`. A joint block is
called `(hidden_states=content, encoder_hidden_states=text, temb_mod, temb_mod_context, rotary)` and
returns `(text, content)`: the dual-stream template fits it as it fits SD3 — at each selected joint
block k its m tokens are prepended to the text and dropped from the block's text output, so block
k + 1 sees the plain text stream. The per-mode text blocks are left alone: there the text attends
only to itself, and the tokens are about how the text meets the image.

Two block arguments run along the text and must grow with the m rows:
* `temb_mod_context` (B, n_txt, 3D): FLUX.3 modulates per token. Every text row carries the same
  values (the embedding of timestep 0 — plus that of the target timestep for a flow-map model —,
  expanded over the text), so the tokens get a copy of the first row (`text_modulation_rows`): they
  are modulated exactly as text;
* the rotary (cos, sin) of the joint sequence [text, image, references]: m copies of the first text
  row (`softrepa.rotary.first_text_rows`, as FLUX.1). FLUX.3's text ids are (0, 0, 0, l) as FLUX.2's,
  but FLUX.2's rule (ids just before the prompt, L = -m .. -1) would put the tokens where FLUX.3 puts
  its reference images (L = -1, -2, ... with their (h, w) grid): with the first text id they relate to
  the prompt, the image and every reference as the prompt's first token does (`softrepa.rotary`).
There is no text attention mask (the padding of the text window is attended to).

Text. The pipeline encodes one prompt per call with Qwen3-VL through its chat template, stacks eight
hidden layers (text width 8 x hidden) and right-pads the prompt to a multiple of 80 tokens (the window
is part of the model's recipe: the padding is not masked). `Flux3Backbone.encode_prompts` calls the
pipeline's own text step for each prompt and keeps each row's window (`extra["length"]`); `denoise`
calls the model once per window length among its rows, so every row sees the text exactly as the
pipeline would give it, whatever other prompts share its batch.

Latents. FLUX.2's VAE (`AutoencoderKLFlux2`): 2 x 2 patches, batch-normed, packed to (B, h * w, 4C)
with ids (0, h / 2, w / 2, 0) (FLUX.3 scales the image grid by 0.5). The backbone works on the
(B, 4C, h, w) patch latent; sigma = t / 1000 (the pipeline calls the model with t / 1000).

Sampling. The stock pipeline is modular: one prompt per call, CFG through its guider
(`ClassifierFreeGuidance`, default 3.5, two calls per step), a constant shift 6.93 on its scheduler,
50 steps. `Flux3Family.render` makes the pipeline's own call per prompt with the CFG scale set on the
guider; `--uncond-tokens` finds the unconditional call through the guider (`softrepa.branches`).
The step-distilled model (`flow_map=True`, `Flux3DistilledModularPipeline`, 16 steps, no CFG) is
called with the timestep each step jumps to; training and FlowEdit use its instantaneous velocity
(`target_timestep` = `timestep`: a jump of length zero), the velocity the loss's target eps - x0 is.
Whether the released distilled weights are accurate at zero-length jumps is not verified (no weights
here); its pipeline only ever asks for jumps to the next of its 16 grid points.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from diffusers import Flux3Transformer2DModel
from torch import nn

from ..backbone import TextCond
from ..errors import SoftrepaError
from ..family import EditPresets, Family, SamplingDefaults, register_family, resolve_denoiser
from ..flow import FlowBackbone, batch_norm_stats, flow_edit_model
from ..flowedit import flow_sigmas
from ..rotary import first_text_rows
from ..templates import DUAL_STREAM, Placement, insert_rows, per_layer

log = logging.getLogger(__name__)

#: key of `TextCond.extra`: (N,) the text window (padded length) of each prompt
LENGTH = "length"
#: the pipeline's defaults where its steps cannot be found (`Flux3TextEncoderStep`, `Flux3PrepareLatentsStep`)
PAD_MULTIPLE, HIDDEN_LAYERS, IMAGE_ROPE_SCALE = 80, (4, 8, 12, 16, 20, 24, 28, 32), 0.5


def pipeline_steps(pipe: Any) -> Iterator[Any]:
    """Every block of a modular pipeline, depth first (the text step, the latents step, the denoise loop).
    The pipeline's own blocks (`_blocks`): its public `blocks` is a deep copy, on which setting a loop's
    progress bar would change nothing."""
    stack = [getattr(pipe, "_blocks", None)]
    while stack:
        block = stack.pop()
        if block is None:
            continue
        yield block
        stack.extend(reversed(list(getattr(block, "sub_blocks", {}).values())))


def find_step(pipe: Any, class_name: str) -> Any:
    """The first block of `pipe` whose class is (or derives from) `class_name`, or None."""
    for block in pipeline_steps(pipe):
        if any(k.__name__ == class_name for k in type(block).__mro__):
            return block
    return None


class Flux3Backbone(FlowBackbone):
    """FLUX.3: rectified flow on batch-normed 2 x 2 latent patches, velocity target eps - x0.

    Args:
        pipe: a `Flux3ModularPipeline` (or its step-distilled sibling).
        max_sequence_length: the most prompt tokens (the pipeline's cap, 8192 by default).
    """

    #: rows a prompt's window may take in a `TextCond` (six windows of 80: prompts up to ~470 tokens)
    text_positions = 480
    text_parts = (("text_encoder", "Qwen3-VL"), ("tokenizer", "its processor"))

    def __init__(self, pipe: Any, max_sequence_length: int | None = None, guidance: float | None = None):
        super().__init__(pipe, max_sequence_length, guidance)
        from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

        step = find_step(pipe, "Flux3TextEncoderStep")
        self.pad_multiple = int(getattr(step, "pad_multiple", PAD_MULTIPLE))
        layers = next((p.default for p in getattr(step, "inputs", []) if p.name == "text_encoder_out_layers"), None)
        self.hidden_layers = tuple(layers or HIDDEN_LAYERS)
        self._encode_one = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds  # the pipeline's own encoder
        latents_step = find_step(pipe, "Flux3PrepareLatentsStep")
        self.image_rope_scale = float(getattr(latents_step, "image_rope_scale", IMAGE_ROPE_SCALE))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, 480, 8 x hidden) (each prompt's window, zero rows after it) and
        extra["length"] (N,): the window, as the pipeline encodes the prompt alone.

        Raises:
            SoftrepaError: a missing text encoder / processor, or a window beyond `text_positions`.
        """
        self.require_text_parts()
        rows, lengths = [], []
        for prompt in prompts:
            e = self._encode_one(text_encoder=self.pipe.text_encoder, tokenizer=self.pipe.tokenizer, prompt=prompt,
                                 device=self.device, max_sequence_length=self.max_sequence_length,
                                 pad_multiple=self.pad_multiple, hidden_states_layers=self.hidden_layers)  # (1, n, D)
            if e.shape[1] > self.text_positions:
                raise SoftrepaError(f"FLUX.3: the prompt {prompt[:60]!r} takes a text window of {e.shape[1]} "
                                    f"tokens, at most {self.text_positions} are supported for training; shorten it")
            rows.append(e[0])
            lengths.append(e.shape[1])
        width = rows[0].shape[-1] if rows else 1
        embeds = torch.zeros(len(rows), self.text_positions, width, device=self.device, dtype=self.dtype)
        for i, e in enumerate(rows):
            embeds[i, :e.shape[0]] = e
        return TextCond(embeds, None, {LENGTH: torch.tensor(lengths, dtype=torch.long, device=self.device)})

    # ---------------------------------------------------------------- latents: patches + batch norm
    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H/f, W/f) VAE latent -> (B, 4C, H/2f, W/2f) model latent, as the pipeline's VAE step."""
        from diffusers.modular_pipelines.flux3.encoders import Flux3VaeEncoderStep

        patches = Flux3VaeEncoderStep._patchify_latents(z)  # (B, 4C, H/2f, W/2f)
        mean, std = batch_norm_stats(self.vae, patches)
        return (patches - mean) / std

    def vae_from_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4C, h, w) model latents -> (B, C, 2h, 2w) VAE latents, as the pipeline's decode step."""
        from diffusers.modular_pipelines.flux3.decoders import Flux3DecodeStep

        mean, std = batch_norm_stats(self.vae, x)
        return Flux3DecodeStep._unpatchify_latents(x * std + mean)

    # ---------------------------------------------------------------- the model call
    def denoise(self, x_t, t, cond, guidance: Any = None):
        """Velocity for (B, 4C, h, w) model latents: one model call per text window among the rows.

        Args:
            x_t: (B, 4C, h, w) noised latents.
            t: (B,) timesteps on the 0..1000 scale.
            cond: the prompts' `TextCond` (with `extra["length"]`; without it every row's full width).
            guidance: ignored (FLUX.3 has no guidance embedding; FlowEdit's conditional-only path passes it).
        """
        from diffusers.modular_pipelines.flux3.before_denoise import (Flux3TextRoPEInputsStep,
                                                                       _prepare_image_ids)

        b, c, h, w = x_t.shape
        device = x_t.device
        packed = x_t.flatten(2).transpose(1, 2)  # (B, h * w, 4C), as the pipeline packs
        img_ids = _prepare_image_ids(h, w, self.image_rope_scale).to(device)  # (h * w, 4)
        timestep = (t.to(device) / 1000.0).to(x_t.dtype)  # (B,), the pipeline's t / 1000
        lengths = cond.extra.get(LENGTH)
        lengths = torch.full((b,), cond.embeds.shape[1]) if lengths is None else lengths.cpu()
        groups = [(n, (lengths == n).nonzero().squeeze(1)) for n in torch.unique(lengths).tolist()]
        preds = []
        for n, rows in groups:
            text = cond.embeds[rows.to(cond.embeds.device), :n].to(device)  # (b_n, n, D)
            kw = {"target_timestep": timestep[rows]} if self.denoiser.config.flow_map else {}
            preds.append(self.denoiser(hidden_states=packed[rows], timestep=timestep[rows], encoder_hidden_states=text,
                                       img_ids=img_ids, txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(text).to(device),
                                       return_dict=False, **kw)[0])  # (b_n, h * w, 4C)
        out = preds[0] if len(groups) == 1 else torch.cat(preds)[torch.argsort(torch.cat([r for _, r in groups]))]
        return out.transpose(1, 2).reshape(b, c, h, w)  # (B, 4C, h, w)


def text_modulation_rows(mod: torch.Tensor, m: int, at: int, state: dict) -> torch.Tensor:
    """(B, n_txt, 3D) per-token text modulation with m copies of its first row inserted at `at`: every
    text row has the same values (timestep 0, plus the target timestep of a flow map), so the tokens are
    modulated as text."""
    return insert_rows(mod, mod[:, :1].expand(-1, m, -1), at)  # (B, n_txt + m, 3D)


@contextlib.contextmanager
def guidance_scale(pipe: Any, scale: float | None) -> Iterator[None]:
    """The pipeline's guider at CFG scale `scale` for the block (restored after); no guider: nothing."""
    guider = getattr(pipe, "guider", None)
    if guider is None or scale is None:
        yield
        return
    before = guider.guidance_scale
    guider.guidance_scale = float(scale)
    try:
        yield
    finally:
        guider.guidance_scale = before


@contextlib.contextmanager
def quiet_loops(pipe: Any) -> Iterator[None]:
    """The denoising loops' progress bars off for the block (the top-level switch does not reach them)."""
    loops = [b for b in pipeline_steps(pipe) if hasattr(b, "set_progress_bar_config")]
    saved = [getattr(b, "_progress_bar_config", None) for b in loops]
    for b in loops:
        b.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        for b, cfg in zip(loops, saved):
            b._progress_bar_config = dict(cfg) if cfg is not None else {}


class Flux3Family(Family):
    name = "flux3"
    title = "FLUX.3"
    denoiser_class = "Flux3Transformer2DModel"
    # the modular pipeline's defaults in diffusers 0.42.1: 50 steps (Flux3SetTimestepsStep), CFG 3.5
    # (Flux3LoopDenoiser's guider); the step-distilled pipeline samples 16 steps without CFG (--steps 16)
    sampling = SamplingDefaults(steps=50, cfg=3.5)
    # No published FlowEdit setting for FLUX.3: SD3's FlowEdit / SoftREPA numbers (FLUX.3 guides with two CFG
    # branches, as SD3), on FLUX.3's shifted 50-step grid. Not measured (docs/families.md).
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="chosen for softrepa, no official FLUX.3 FlowEdit setting: SD3's FlowEdit / SoftREPA "
                              "numbers on FLUX.3's sigma grid")
    cfg_branches = "guider"  # the modular pipeline's guider prepares one call per branch
    text_length = 8192  # the pipeline's max_sequence_length: a cap; each prompt takes its own window of 80s
    native_size = 1024  # Flux3PrepareLatentsStep's default height and width
    block_list = "single_transformer_blocks"
    placement = Placement(DUAL_STREAM, select=per_layer("single_transformer_blocks"), timestep_scale=1000.0,
                          rotary_arg="image_rotary_emb", rotary=first_text_rows,
                          grow=(("temb_mod_context", text_modulation_rows),))

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, Flux3Transformer2DModel)

    def applied_cfg(self, pipe: Any, cfg: float) -> float:
        """A pipeline without a guider (the step-distilled one) samples without CFG: 1.0, and a warning when
        another scale was asked for (it would be ignored)."""
        if getattr(pipe, "guider", None) is not None:
            return float(cfg)
        if float(cfg) != 1.0:
            log.warning("CFG %.2f ignored: %s has no guider (the step-distilled FLUX.3 samples without CFG)",
                        float(cfg), type(pipe).__name__)
        return 1.0

    def sampling_for(self, pipe: Any) -> SamplingDefaults:
        """The step-distilled pipeline (no guider): its 16 steps (Flux3DistilledModularPipeline's default) and no
        CFG (recorded as 1.0, the scale that guides nothing)."""
        if getattr(pipe, "guider", None) is None and resolve_denoiser(pipe).config.flow_map:
            return SamplingDefaults(steps=16, cfg=1.0)
        return self.sampling

    def backbone(self, pipe: Any, **kwargs: Any) -> Flux3Backbone:
        return Flux3Backbone(pipe, **kwargs)

    def render(self, pipe: Any, prompts: Sequence[str], generators: Sequence[Any], *, steps: int, height: int,
               width: int, call_kwargs: dict[str, Any], output_type: str = "pil") -> list:
        """The modular pipeline's own call, once per prompt (it takes one), the CFG scale on its guider
        (`guidance_scale` in `call_kwargs`; ignored by the guider-less step-distilled pipeline)."""
        kw = dict(call_kwargs)
        scale = kw.pop("guidance_scale", None)
        images: list = []
        with guidance_scale(pipe, scale), quiet_loops(pipe):
            for prompt, generator in zip(prompts, generators):
                out = pipe(prompt=prompt, generator=generator, num_inference_steps=steps, height=height, width=width,
                           output_type=output_type, output="images", **kw)
                images += list(out)  # PIL images, or (H, W, 3) arrays
        return images

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        """The pipeline's grid: linspace(1, 1 / steps, steps) through its scheduler (constant shift 6.93).
        Guidance: two CFG branches; the step-distilled model takes none (plain conditional velocities,
        as its pipeline samples it)."""
        seq = latent_shape[-2] * latent_shape[-1]
        sigmas = flow_sigmas(backbone.pipe.scheduler, steps, seq, base_sigmas=np.linspace(1.0, 1.0 / steps, steps))
        return flow_edit_model(backbone, sigmas, embedded=bool(backbone.denoiser.config.flow_map))


register_family(Flux3Family())
