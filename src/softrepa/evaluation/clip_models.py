"""CLIP-family scores: CLIP score, PickScore and HPSv2, all on transformers' `CLIPModel`.

* CLIP score: the SoftREPA authors' eval.py calls ImageReward's `CLIPScore` (OpenAI CLIP ViT-L/14),
  whose score is the plain cosine similarity of the L2-normalised image and text embeddings: no
  x100, no clamp. That is the scale of the paper's table (~0.26). Hessel et al.'s CLIPScore
  (w * max(cos, 0), w = 2.5) is available through the `w` / `clamp_zero` options.
* PickScore (Kirstain et al.): `exp(logit_scale) * cos` with the PickScore_v1 CLIP-H model, the
  reference code's formula (~21-23 on COCO prompts).
* HPSv2 (Wu et al.): `cos` of an open_clip ViT-H-14 fine-tuned on human preferences (~0.25-0.29).
  The SoftREPA authors score with HPS v2.1 (`hpsv2.score(..., hps_version="v2.1")`, checkpoint
  `HPS_v2.1_compressed.pt`), the default here; v2.0 is `filename: HPS_v2_compressed.pt`.
  Both published checkpoints are open_clip state dicts; the open_clip package imports
  torchvision at import time (which does not import beside our CPU torch), so the checkpoint is
  converted key by key into transformers' `CLIPModel`, which has the same architecture (pre-LN
  ViT, causal text transformer pooled at the EOT token, bias-free projections). The expected
  open_clip key -> shape table is `openclip_state_shapes`; tests load that table with strict=True.

Every score uses its reference package's preprocessing and prompts truncated to the 77-token
context (BOS + 75 tokens + EOS, as `clip.tokenize(truncate=True)` / open_clip's `tokenize`):

| metric | image (`preprocess`) | text (`text_cleaning`) |
|---|---|---|
| clip | `center_crop`: shorter side to 224 (bicubic), centre crop, offset rounded (torchvision) | `official`: ftfy + html.unescape x2 + whitespace (OpenAI `clip.tokenize`) |
| pickscore | `center_crop_floor`: same, offset floored: transformers' `CLIPImageProcessor` itself (its PIL backend) | `none` (transformers' CLIP tokenizer, as PickScore's processor) |
| hps | `letterbox`: longest side to 224, zero padding (hpsv2 `ResizeMaxSize`) | `official` (open_clip `tokenize`) |

`center_crop_floor` runs transformers' CLIP image processor on its PIL / numpy backend
(`CLIPImageProcessorPil` in transformers 5, which `CLIPImageProcessor` falls back to without
torchvision; `CLIPImageProcessor` in transformers 4): PickScore's own preprocessing, and bit for
bit the hand-written `clip_pixels(..., crop_offset="floor")` (tests/test_metric_registry.py).
`center_crop` and `letterbox` stay hand-written, see `CLIPScorer.pixels`.

The metrics.yaml sections are `ClipConfig`, `PickScoreConfig` and `HPSConfig`; the specs `CLIP`,
`PICKSCORE` and `HPS` (kind `PER_PROMPT`) are declared and registered at the end of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import (CLIP_MEAN, CLIP_STD, MetricError, WeightsError, clean_text, clip_pixels, letterbox_pixels,
                     load_on_meta, load_state_dict, resolve_file, resolve_pretrained)
from .spec import MetricConfig, MetricKind, MetricSpec, optional, register_metric

#: open_clip architecture presets (open_clip's model_configs JSON format).
OPENCLIP_PRESETS = {
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
}
HPS_URL = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"
#: hpsv2's `hps_version_map`: version -> checkpoint file in the xswu/HPSv2 hub repo.
HPS_VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
#: Image preprocessing of each reference (see the module docstring).
PREPROCESS = ("center_crop", "center_crop_floor", "letterbox")
TEXT_CLEANING = ("official", "none")
CLIP_URL = "https://huggingface.co/openai/clip-vit-large-patch14"
PICKSCORE_URL = "https://huggingface.co/yuvalkirstain/PickScore_v1"
LAION_H14_URL = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _arch(arch: str | dict) -> dict:
    if isinstance(arch, str):
        if arch not in OPENCLIP_PRESETS:
            raise WeightsError(f"hps: unknown open_clip architecture {arch!r}; give one of "
                               f"{sorted(OPENCLIP_PRESETS)} or the model config dict")
        arch = OPENCLIP_PRESETS[arch]
    v = {"head_width": 64, "mlp_ratio": 4.0, **arch["vision_cfg"]}
    t = {"context_length": 77, "vocab_size": 49408, "heads": 8, "mlp_ratio": 4.0, **arch["text_cfg"]}
    return {"embed_dim": arch["embed_dim"], "vision": v, "text": t, "quick_gelu": arch.get("quick_gelu", False)}


def openclip_state_shapes(arch: str | dict) -> dict[str, tuple]:
    """Key -> shape of an open_clip `CLIP` state dict (ViT image tower, default text tower).

    Derived from open_clip's `VisionTransformer` / text `Transformer` (nn.MultiheadAttention with a
    fused in_proj, `c_fc` / `c_proj` MLP, `ln_pre` / `ln_post`, `proj`, `text_projection`).

    Args:
        arch: preset name (e.g. "ViT-H-14") or an open_clip model config dict.
    """
    a = _arch(arch)
    v, t, e = a["vision"], a["text"], a["embed_dim"]
    out: dict[str, tuple] = {"positional_embedding": (t["context_length"], t["width"]),
                             "text_projection": (t["width"], e), "logit_scale": (),
                             "token_embedding.weight": (t["vocab_size"], t["width"]),
                             "ln_final.weight": (t["width"],), "ln_final.bias": (t["width"],)}
    grid = v["image_size"] // v["patch_size"]
    out.update({"visual.class_embedding": (v["width"],),
                "visual.positional_embedding": (grid * grid + 1, v["width"]),
                "visual.proj": (v["width"], e),
                "visual.conv1.weight": (v["width"], 3, v["patch_size"], v["patch_size"])})
    for ln in ("ln_pre", "ln_post"):
        out.update({f"visual.{ln}.weight": (v["width"],), f"visual.{ln}.bias": (v["width"],)})
    for prefix, c in (("visual.transformer", v), ("transformer", t)):
        w, hid = c["width"], int(c["width"] * c["mlp_ratio"])
        for i in range(c["layers"]):
            p = f"{prefix}.resblocks.{i}."
            out.update({p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                        p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                        p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                        p + "mlp.c_fc.weight": (hid, w), p + "mlp.c_fc.bias": (hid,),
                        p + "mlp.c_proj.weight": (w, hid), p + "mlp.c_proj.bias": (w,)})
    return out


def hf_clip_config(arch: str | dict):
    """The transformers `CLIPConfig` of an open_clip architecture.

    The text `eos_token_id` is 2, which makes transformers pool at `input_ids.argmax(-1)`, exactly
    open_clip's `text.argmax(dim=-1)` (the EOT token has the highest id in the CLIP vocabulary).

    Args:
        arch: preset name or open_clip model config dict.
    """
    from transformers import CLIPConfig

    a = _arch(arch)
    v, t = a["vision"], a["text"]
    act = "quick_gelu" if a["quick_gelu"] else "gelu"
    return CLIPConfig(
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["width"], num_hidden_layers=t["layers"],
                         intermediate_size=int(t["width"] * t["mlp_ratio"]), num_attention_heads=t["heads"],
                         max_position_embeddings=t["context_length"], hidden_act=act, layer_norm_eps=1e-5,
                         eos_token_id=2, bos_token_id=t["vocab_size"] - 2, pad_token_id=0),
        vision_config=dict(hidden_size=v["width"], num_hidden_layers=v["layers"],
                           intermediate_size=int(v["width"] * v["mlp_ratio"]),
                           num_attention_heads=v["width"] // v["head_width"], image_size=v["image_size"],
                           patch_size=v["patch_size"], hidden_act=act, layer_norm_eps=1e-5),
        projection_dim=a["embed_dim"])


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename / reshape an open_clip CLIP state dict into transformers `CLIPModel` keys.

    Args:
        sd: open_clip state dict (keys as in `openclip_state_shapes`).
    Returns:
        A state dict for `CLIPModel(hf_clip_config(arch))`.
    """
    out = {}
    for k, val in sd.items():
        if k.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
            tower = "vision_model" if k.startswith("visual.") else "text_model"
            i = k.split("resblocks.")[1].split(".")[0]
            rest = k.split(f"resblocks.{i}.")[1]
            base = f"{tower}.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), val.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part
                continue
            mod, kind = rest.rsplit(".", 1)
            if mod not in _BLOCK:
                out["?" + k] = val  # surfaces as an unexpected key in check_keys
                continue
            out[f"{base}{_BLOCK[mod]}.{kind}"] = val
            continue
        simple = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias", "logit_scale": "logit_scale",
                  "visual.class_embedding": "vision_model.embeddings.class_embedding",
                  "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                  "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                  "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                  "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                  "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                  "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
        if k in simple:
            out[simple[k]] = val
        elif k == "visual.proj":  # x @ proj  ==  Linear(weight=proj.T)
            out["visual_projection.weight"] = val.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = val.t().contiguous()
        else:
            out["?" + k] = val
    return out


class CLIPScorer:
    """Per-image text-image score `w * cos(image, text)` (optionally clamped) from a `CLIPModel`.

    Args:
        model: a transformers `CLIPModel`.
        tokenizer: its CLIP tokenizer.
        name: metric name (messages, progress bars).
        w: multiplier; "logit_scale" uses `exp(model.logit_scale)` (PickScore).
        clamp_zero: apply max(cos, 0) first (Hessel et al.'s CLIPScore).
        image_mean, image_std: preprocessing normalisation.
        preprocess: "center_crop" (torchvision: OpenAI CLIP), "center_crop_floor" (transformers'
            processor: PickScore) or "letterbox" (hpsv2).
        text_cleaning: "official" (ftfy + html.unescape + whitespace, the OpenAI / open_clip
            tokenizers) or "none" (the tokenizer's own normalisation only).
        device, dtype: where / how the model runs.
    """

    #: The checkpoint file name, recorded in results.json (set by `load_hps`).
    checkpoint: str | None = None

    def __init__(self, model, tokenizer, *, name: str, w: float | str = 1.0, clamp_zero: bool = False,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, preprocess: str = "center_crop",
                 text_cleaning: str = "official", device="cpu", dtype=torch.float32):
        if preprocess not in PREPROCESS:
            raise MetricError(f"{name}: preprocess must be one of {list(PREPROCESS)}, got {preprocess!r}")
        if text_cleaning not in TEXT_CLEANING:
            raise MetricError(f"{name}: text_cleaning must be one of {list(TEXT_CLEANING)}, got {text_cleaning!r}")
        self.preprocess, self.text_cleaning = preprocess, text_cleaning
        self.name, self.tokenizer, self.device, self.dtype = name, tokenizer, torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval()
        self.scale = float(model.logit_scale.detach().float().exp()) if w == "logit_scale" else float(w)
        self.clamp_zero = clamp_zero
        self.mean, self.std = tuple(image_mean), tuple(image_std)
        self._processor = None
        self.size = int(model.config.vision_config.image_size)
        self.max_length = int(min(model.config.text_config.max_position_embeddings,
                                  getattr(tokenizer, "model_max_length", 77) or 77, 77))

    def pixels(self, images) -> torch.Tensor:
        """(B, 3, size, size) model inputs of PIL images, this metric's reference preprocessing.

        "center_crop_floor" (PickScore) is transformers' CLIP image processor itself: identical,
        bit for bit, to `clip_pixels(..., crop_offset="floor")` (measured max |difference| 0 on
        120 random sizes and on every uint8 value; tests/test_metric_registry.py checks it).
        "center_crop" (OpenAI CLIP, torchvision `CenterCrop`) stays hand-written: the processor
        floors the crop offset where torchvision rounds it, so whenever (side - 224) / 2 ends in
        .5 and rounds up the window moves by one pixel (35 of those 120 sizes; max |difference|
        3.74 in normalised units on random-noise images). "letterbox" (hpsv2's `ResizeMaxSize`:
        longest side, zero padding) is no transformers processor at all.
        """
        if self.preprocess == "letterbox":
            return letterbox_pixels(images, self.size, self.mean, self.std)
        if self.preprocess == "center_crop_floor":
            if self._processor is None:
                self._processor = clip_image_processor(self.size, self.mean, self.std)
            return self._processor(images=list(images), return_tensors="pt",
                                   input_data_format="channels_last")["pixel_values"]
        return clip_pixels(images, self.size, self.mean, self.std, crop_offset="round")

    def info(self) -> dict[str, Any]:
        """What results.json records about this scorer: preprocessing, text cleaning, checkpoint."""
        return {k: getattr(self, k) for k in ("preprocess", "text_cleaning", "checkpoint") if getattr(self, k, None)}

    def tokenize(self, prompts) -> dict:
        """Token ids (+ attention mask) of prompts, this metric's reference text cleaning first."""
        texts = [clean_text(p) if self.text_cleaning == "official" else p for p in prompts]
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def score(self, images, prompts) -> np.ndarray:
        """Scores of a batch of (PIL image, prompt) pairs, as float64."""
        m = self.model
        pix = self.pixels(images).to(self.device, self.dtype)
        tok = self.tokenize(list(prompts)).to(self.device)
        # Towers + projections called directly: `get_*_features` changed return type in transformers 5.
        img = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        txt = m.text_projection(m.text_model(input_ids=tok["input_ids"],
                                             attention_mask=tok.get("attention_mask")).pooler_output)
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        if self.clamp_zero:
            cos = cos.clamp_min(0)
        return (self.scale * cos).double().cpu().numpy()


def clip_image_processor(size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """transformers' CLIP image processor on its PIL / numpy backend (no torchvision needed).

    Shorter side to `size` (PIL bicubic), centre crop with the offset floored, x / 255,
    normalisation: PickScore's preprocessing. transformers 5 names that backend
    `CLIPImageProcessorPil` (`CLIPImageProcessor` is the torchvision one there, and only falls
    back to it when torchvision is missing); in transformers 4 it is `CLIPImageProcessor`.

    Args:
        size: model input side.
        mean, std: per-channel normalisation.
    """
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                     do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def _tokenizer(spec, *, metric, url, offline):
    from transformers import AutoTokenizer

    return resolve_pretrained(AutoTokenizer.from_pretrained, spec, metric=metric, what="tokenizer", url=url,
                              offline=offline)


def load_clip_score(cfg: "ClipConfig | dict", *, device="cpu", dtype=torch.float32, offline=True) -> CLIPScorer:
    """CLIP score from `cfg` (`ClipConfig`: model, tokenizer (default: model), w (1.0), clamp_zero (false), ...)."""
    from transformers import CLIPModel

    cfg = ClipConfig.coerce(cfg, metric="clip")
    model = resolve_pretrained(CLIPModel.from_pretrained, cfg.model, metric="clip", what="CLIP model",
                               url=CLIP_URL, offline=offline)
    tok = _tokenizer(cfg.tokenizer or cfg.model, metric="clip", url=CLIP_URL, offline=offline)
    return CLIPScorer(model, tok, name="clip", w=cfg.w, clamp_zero=bool(cfg.clamp_zero), image_mean=cfg.image_mean,
                      image_std=cfg.image_std, preprocess=cfg.preprocess, text_cleaning=cfg.text_cleaning,
                      device=device, dtype=dtype)


def load_pickscore(cfg: "PickScoreConfig | dict", *, device="cpu", dtype=torch.float32, offline=True) -> CLIPScorer:
    """PickScore from `cfg` (`PickScoreConfig`: model PickScore_v1, tokenizer: the CLIP-H processor's, ...)."""
    from transformers import CLIPModel

    cfg = PickScoreConfig.coerce(cfg, metric="pickscore")
    model = resolve_pretrained(CLIPModel.from_pretrained, cfg.model, metric="pickscore",
                               what="PickScore model", url=PICKSCORE_URL, offline=offline)
    tok = _tokenizer(cfg.tokenizer or cfg.model, metric="pickscore", url=LAION_H14_URL, offline=offline)
    return CLIPScorer(model, tok, name="pickscore", w="logit_scale", image_mean=cfg.image_mean,
                      image_std=cfg.image_std, preprocess=cfg.preprocess, text_cleaning=cfg.text_cleaning,
                      device=device, dtype=dtype)


def hps_filename(cfg: "HPSConfig | dict") -> str:
    """The HPS checkpoint file of `cfg`: `filename`, else the file of `version` (default v2.1)."""
    cfg = HPSConfig.coerce(cfg, metric="hps")
    if cfg.version not in HPS_VERSIONS:
        raise WeightsError(f"hps: version must be one of {sorted(HPS_VERSIONS)}, got {cfg.version!r}")
    return cfg.filename or HPS_VERSIONS[cfg.version]


def load_hps(cfg: "HPSConfig | dict", *, device="cpu", dtype=torch.float32, offline=True) -> CLIPScorer:
    """HPSv2 from `cfg` (`HPSConfig`: weights (file / folder / hub repo), version (v2.1) or filename, ...)."""
    from transformers import CLIPModel

    cfg = HPSConfig.coerce(cfg, metric="hps")
    filename = hps_filename(cfg)
    url = HPS_URL.rsplit("/", 1)[0] + "/" + filename
    path = resolve_file(cfg.weights, metric="hps", what="HPS checkpoint", filename=filename, url=url,
                        offline=offline)
    arch = cfg.architecture
    sd = openclip_to_hf(load_state_dict(path, metric="hps", key="state_dict"))
    model = load_on_meta(lambda: CLIPModel(hf_clip_config(arch)), sd, metric="hps", path=path)
    tok = _tokenizer(cfg.tokenizer, metric="hps", url=LAION_H14_URL, offline=offline)
    scorer = CLIPScorer(model, tok, name="hps", w=1.0, image_mean=cfg.image_mean, image_std=cfg.image_std,
                        preprocess=cfg.preprocess, text_cleaning=cfg.text_cleaning, device=device, dtype=dtype)
    scorer.checkpoint = path.name
    return scorer


# ------------------------------------------------------------------------------ configs and specs

@dataclass(frozen=True)
class ClipConfig(MetricConfig):
    """metrics.yaml `clip`: the paper's CLIP score (OpenAI ViT-L/14, w * cosine, no clamp).

    Args:
        model: transformers `CLIPModel` folder or hub id.
        w: multiplier of the cosine (Hessel et al.'s CLIPScore: 2.5 with clamp_zero).
        clamp_zero: max(cos, 0) first.
        preprocess, text_cleaning: see the module docstring's table.
        tokenizer: tokenizer folder / id (default: `model`'s).
        image_mean, image_std: preprocessing normalisation (default: OpenAI CLIP's).
    """

    model: str | None = "openai/clip-vit-large-patch14"
    w: float | str = 1.0
    clamp_zero: bool = False
    preprocess: str = "center_crop"
    text_cleaning: str = "official"
    tokenizer: str | None = optional(None)
    image_mean: Sequence[float] = optional(CLIP_MEAN)
    image_std: Sequence[float] = optional(CLIP_STD)


@dataclass(frozen=True)
class PickScoreConfig(MetricConfig):
    """metrics.yaml `pickscore`: PickScore_v1, exp(logit_scale) * cosine.

    Args:
        model: the PickScore `CLIPModel` folder or hub id.
        tokenizer: its processor's tokenizer (LAION's CLIP-H; default: `model`'s when null).
        preprocess, text_cleaning: see the module docstring's table.
        image_mean, image_std: preprocessing normalisation (default: OpenAI CLIP's).
    """

    model: str | None = "yuvalkirstain/PickScore_v1"
    tokenizer: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    preprocess: str = "center_crop_floor"
    text_cleaning: str = "none"
    image_mean: Sequence[float] = optional(CLIP_MEAN)
    image_std: Sequence[float] = optional(CLIP_STD)


@dataclass(frozen=True)
class HPSConfig(MetricConfig):
    """metrics.yaml `hps`: HPS v2.1 (the authors' version) on an open_clip ViT-H-14.

    Args:
        weights: checkpoint file, a folder holding it, or the hub repo (xswu/HPSv2).
        version: "v2.1" or "v2.0" (picks the file name, `HPS_VERSIONS`).
        filename: overrides the version's file name.
        architecture: open_clip preset name or model-config dict.
        tokenizer: a CLIP BPE tokenizer folder / id.
        preprocess, text_cleaning: see the module docstring's table.
        image_mean, image_std: preprocessing normalisation (default: OpenAI CLIP's).
    """

    weights: str | None = "xswu/HPSv2"
    version: str = "v2.1"
    filename: str | None = None
    architecture: str | dict = "ViT-H-14"
    tokenizer: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    preprocess: str = "letterbox"
    text_cleaning: str = "official"
    image_mean: Sequence[float] = optional(CLIP_MEAN)
    image_std: Sequence[float] = optional(CLIP_STD)


PICKSCORE = MetricSpec(name="pickscore", kind=MetricKind.PER_PROMPT, loader=load_pickscore, config=PickScoreConfig,
                       note="PickScore_v1: exp(logit_scale) * cosine (higher = preferred)", higher_is_better=True)
CLIP = MetricSpec(name="clip", kind=MetricKind.PER_PROMPT, loader=load_clip_score, config=ClipConfig,
                  note="CLIP score = w * cosine of L2-normalised embeddings (paper: ViT-L/14, w=1, no clamp, no x100)",
                  higher_is_better=True)
HPS = MetricSpec(name="hps", kind=MetricKind.PER_PROMPT, loader=load_hps, config=HPSConfig,
                 note="HPS (default v2.1, as the authors): cosine of the HPS-tuned open_clip ViT-H-14 embeddings",
                 higher_is_better=True)
for _spec in (PICKSCORE, CLIP, HPS):  # the paper's table order
    register_metric(_spec)


__all__ = ["CLIP", "CLIPScorer", "ClipConfig", "HPS", "HPSConfig", "HPS_VERSIONS", "OPENCLIP_PRESETS", "PICKSCORE",
           "PREPROCESS", "PickScoreConfig", "TEXT_CLEANING", "clip_image_processor", "hf_clip_config", "hps_filename",
           "load_clip_score", "load_hps", "load_pickscore", "openclip_state_shapes", "openclip_to_hf"]
