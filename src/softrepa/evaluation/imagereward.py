"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

ImageReward-v1.0 is BLIP (ViT-L/16 image encoder + a BERT-base text encoder that cross-attends to
the image) with a 5-layer linear MLP on the text [CLS] state; the raw reward is standardised with
the training-set mean / std. The `image-reward` package cannot run here: it imports `clip`, `timm`
and torchvision at import time and its vendored BERT (`med.py`) uses helpers removed from
transformers 5. transformers ships the same architecture as `BlipVisionModel` / `BlipTextModel`
(ported from BLIP's `vit.py` / `med.py`), so this module renames the published checkpoint's keys
onto those classes and reproduces `ImageReward.score`:

    tokens = bert_tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
    emb    = visual_encoder(clip_transform(image))                      # (B, 197, 1024)
    h      = text_encoder(tokens, encoder_hidden_states=emb).last_hidden_state[:, 0]
    reward = (mlp(h) - 0.16717362830052426) / 1.0333394966054072

`imagereward_state_shapes` lists the key -> shape table of the published `ImageReward.pt` (the
`ImageReward` module's state dict: `blip.visual_encoder.*`, `blip.text_encoder.*`, the unused
`blip.vision_proj` / `blip.text_proj` heads, `mlp.layers.*`); tests load it with strict checks.

The image transform is BLIP's (torchvision `Resize(224, bicubic)` + `CenterCrop` + normalisation),
hand-written in `clip_pixels`: transformers' CLIP image processor floors the centre crop's offset
where torchvision rounds it (see `clip_models.CLIPScorer.pixels`), so it is not used here.
The metrics.yaml section is `ImageRewardConfig`; the spec `IMAGEREWARD` (kind `PER_PROMPT`) is
declared and registered at the end of this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .common import (CLIP_MEAN, CLIP_STD, WeightsError, clip_pixels, load_on_meta, load_state_dict, resolve_file,
                     resolve_pretrained)
from .spec import MetricConfig, MetricKind, MetricSpec, optional, register_metric

IMAGEREWARD_URL = "https://huggingface.co/THUDM/ImageReward/resolve/main/ImageReward.pt"
MED_CONFIG_URL = "https://huggingface.co/THUDM/ImageReward/resolve/main/med_config.json"
BERT_URL = "https://huggingface.co/google-bert/bert-base-uncased"
#: Reward standardisation constants of ImageReward-v1.0 (ImageReward.py).
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
#: BLIP "large" image encoder (blip.create_vit('large', 224)).
VIT_LARGE = {"image_size": 224, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16}
#: BERT-base as in ImageReward's med_config.json (vocab 30522 + [DEC] + [ENC]).
MED_BASE = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "max_position_embeddings": 512, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "pad_token_id": 0}
_MLP_DIMS = (1024, 128, 64, 16, 1)  # Linear layers at Sequential indices 0, 2, 4, 6, 7 (dropouts between)
_MLP_IDX = (0, 2, 4, 6, 7)
#: Keys of the published checkpoint that the score does not use (BLIP's contrastive heads, a buffer).
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")


class _MLP(nn.Module):
    """ImageReward's reward head; same Sequential indices as the original (dropouts are no-ops at eval)."""

    def __init__(self, width: int):
        super().__init__()
        dims, layers = (width, *_MLP_DIMS), []
        for i in range(5):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < 3:
                layers.append(nn.Dropout(0.0))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head, on transformers' BLIP classes.

    Args:
        med_config: BERT config dict (ImageReward's med_config.json keys).
        vision: image encoder dims {image_size, patch_size, width, layers, heads}.
    """

    def __init__(self, med_config: dict | None = None, vision: dict | None = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        med, v = {**MED_BASE, **(med_config or {})}, {**VIT_LARGE, **(vision or {})}
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"], image_size=v["image_size"], patch_size=v["patch_size"],
            hidden_act="gelu", layer_norm_eps=1e-6))  # timm ViT in BLIP: exact GELU, LayerNorm eps 1e-6
        # is_decoder=True only makes transformers build the cross-attention layers (BLIP's
        # `add_cross_attention`); the forward below runs the encoder bidirectionally (is_decoder=False).
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=v["width"],
            intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
            hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
            bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation ids: unused by the encoder
            is_decoder=True), add_pooling_layer=False)
        self.mlp = _MLP(med["hidden_size"])
        self.image_size = v["image_size"]

    def forward(self, pixel_values, input_ids, attention_mask):
        """Standardised rewards, shape (B,)."""
        emb = self.vision(pixel_values=pixel_values).last_hidden_state
        ones = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=emb,
                      encoder_attention_mask=ones, is_decoder=False).last_hidden_state[:, 0]
        return ((self.mlp(h).float() - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def imagereward_state_shapes(med_config: dict | None = None, vision: dict | None = None) -> dict[str, tuple]:
    """Key -> shape of the published ImageReward checkpoint for the given dims.

    Derived from ImageReward's modules: BLIP `VisionTransformer` (timm-style `patch_embed.proj`,
    `cls_token`, `pos_embed`, `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`,
    `norm`), med.py `BertModel(add_pooling_layer=False)` with cross-attention in every layer and a
    persistent `position_ids` buffer, BLIP_Pretrain's `vision_proj` / `text_proj` (256-d) and the MLP.

    Args:
        med_config: BERT config dict (defaults: bert-base, vocab 30524).
        vision: image encoder dims (defaults: ViT-L/16 at 224).
    """
    med, v = {**MED_BASE, **(med_config or {})}, {**VIT_LARGE, **(vision or {})}
    D, H, I = v["width"], med["hidden_size"], med["intermediate_size"]
    n = (v["image_size"] // v["patch_size"]) ** 2 + 1
    out: dict[str, tuple] = {"blip.visual_encoder.cls_token": (1, 1, D), "blip.visual_encoder.pos_embed": (1, n, D),
                             "blip.visual_encoder.patch_embed.proj.weight": (D, 3, v["patch_size"], v["patch_size"]),
                             "blip.visual_encoder.patch_embed.proj.bias": (D,),
                             "blip.visual_encoder.norm.weight": (D,), "blip.visual_encoder.norm.bias": (D,)}
    for i in range(v["layers"]):
        p = f"blip.visual_encoder.blocks.{i}."
        for name, shape in (("norm1", (D,)), ("norm2", (D,)), ("attn.proj", (D, D)), ("attn.qkv", (3 * D, D)),
                            ("mlp.fc1", (4 * D, D)), ("mlp.fc2", (D, 4 * D))):
            out[p + name + ".weight"], out[p + name + ".bias"] = shape, shape[:1]
    t = "blip.text_encoder."
    out.update({t + "embeddings.position_ids": (1, med["max_position_embeddings"]),
                t + "embeddings.word_embeddings.weight": (med["vocab_size"], H),
                t + "embeddings.position_embeddings.weight": (med["max_position_embeddings"], H),
                t + "embeddings.LayerNorm.weight": (H,), t + "embeddings.LayerNorm.bias": (H,)})
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        lin = {"attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
               "attention.output.dense": (H, H), "attention.output.LayerNorm": (H,),
               "crossattention.self.query": (H, H), "crossattention.self.key": (H, D),
               "crossattention.self.value": (H, D), "crossattention.output.dense": (H, H),
               "crossattention.output.LayerNorm": (H,), "intermediate.dense": (I, H), "output.dense": (H, I),
               "output.LayerNorm": (H,)}
        for name, shape in lin.items():
            out[p + name + ".weight"], out[p + name + ".bias"] = shape, shape[:1]
    out.update({"blip.vision_proj.weight": (256, D), "blip.vision_proj.bias": (256,),
                "blip.text_proj.weight": (256, H), "blip.text_proj.bias": (256,)})
    dims = (H, *_MLP_DIMS)
    for j, idx in enumerate(_MLP_IDX):
        out[f"mlp.layers.{idx}.weight"], out[f"mlp.layers.{idx}.bias"] = (dims[j + 1], dims[j]), (dims[j + 1],)
    return out


_VIT = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def convert_imagereward(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the published checkpoint's keys onto `ImageRewardModel` (unused heads dropped).

    Args:
        sd: the `ImageReward.pt` state dict.
    """
    out = {}
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    for k, val in sd.items():
        if k.startswith(UNUSED_PREFIXES) or k.endswith("embeddings.position_ids"):
            continue
        if k.startswith("blip.visual_encoder."):
            rest = k[len("blip.visual_encoder."):]
            if rest in fixed:
                out["vision." + fixed[rest]] = val
            elif rest.startswith("blocks."):
                _, i, tail = rest.split(".", 2)
                mod, kind = tail.rsplit(".", 1)
                out[f"vision.encoder.layers.{i}.{_VIT.get(mod, '?' + mod)}.{kind}"] = val
            else:
                out["?" + k] = val
        elif k.startswith("blip.text_encoder."):
            out["text." + k[len("blip.text_encoder."):]] = val  # same names: transformers ported med.py
        else:
            out[k] = val  # mlp.layers.*; anything else surfaces as unexpected
    return out


def load_bert_tokenizer(spec, *, offline: bool):
    """BLIP's tokenizer: bert-base-uncased plus the [DEC] (bos) and [ENC] special tokens."""
    from transformers import AutoTokenizer

    tok = resolve_pretrained(AutoTokenizer.from_pretrained, spec, metric="imagereward", what="BERT tokenizer",
                             url=BERT_URL, offline=offline)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


class ImageRewardScorer:
    """Per-image ImageReward scores.

    Args:
        model: `ImageRewardModel` with weights loaded.
        tokenizer: BLIP's BERT tokenizer.
        device, dtype: where / how the model runs.
    """

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, *, device="cpu", dtype=torch.float32):
        self.model, self.tokenizer = model.to(device, dtype).eval(), tokenizer
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def score(self, images, prompts) -> np.ndarray:
        """Rewards of a batch of (PIL image, prompt) pairs, as float64."""
        pix = clip_pixels(images, self.model.image_size, CLIP_MEAN, CLIP_STD).to(self.device, self.dtype)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(self.device)
        return self.model(pix, tok["input_ids"], tok["attention_mask"]).double().cpu().numpy()


def load_imagereward(cfg: "ImageRewardConfig | dict", *, device="cpu", dtype=torch.float32,
                     offline=True) -> ImageRewardScorer:
    """ImageReward from `cfg` (`ImageRewardConfig`: weights, filename, med_config, tokenizer, vision)."""
    cfg = ImageRewardConfig.coerce(cfg, metric="imagereward")
    path = resolve_file(cfg.weights, metric="imagereward", what="ImageReward checkpoint",
                        filename=cfg.filename, url=IMAGEREWARD_URL, offline=offline)
    med_path = resolve_file(cfg.med_config, metric="imagereward", what="BLIP med_config.json",
                            filename="med_config.json", url=MED_CONFIG_URL, offline=offline)
    med = json.loads(med_path.read_text())
    tok = load_bert_tokenizer(cfg.tokenizer, offline=offline)
    if len(tok) > med.get("vocab_size", MED_BASE["vocab_size"]):
        raise WeightsError(f"imagereward: tokenizer has {len(tok)} tokens but med_config vocab_size is "
                           f"{med.get('vocab_size')}")
    sd = convert_imagereward(load_state_dict(path, metric="imagereward"))
    model = load_on_meta(lambda: ImageRewardModel(med, cfg.vision), sd, metric="imagereward", path=path)
    return ImageRewardScorer(model, tok, device=device, dtype=dtype)


@dataclass(frozen=True)
class ImageRewardConfig(MetricConfig):
    """metrics.yaml `imagereward`: ImageReward-v1.0.

    Args:
        weights: `ImageReward.pt`, a folder holding `filename`, or the hub repo (THUDM/ImageReward).
        filename: the checkpoint file inside a folder / hub repo.
        med_config: BLIP's med_config.json, a folder holding it, or the hub repo.
        tokenizer: bert-base-uncased folder / id.
        vision: image encoder dims {image_size, patch_size, width, layers, heads} (default ViT-L/16).
    """

    weights: str | None = "THUDM/ImageReward"
    filename: str | None = "ImageReward.pt"
    med_config: str | None = "THUDM/ImageReward"
    tokenizer: str | None = "google-bert/bert-base-uncased"
    vision: dict | None = optional(None)


IMAGEREWARD = MetricSpec(name="imagereward", kind=MetricKind.PER_PROMPT, loader=load_imagereward,
                         config=ImageRewardConfig, higher_is_better=True,
                         note="ImageReward-v1.0 standardised reward (higher = preferred)")
register_metric(IMAGEREWARD)


__all__ = ["IMAGEREWARD", "ImageRewardConfig", "ImageRewardModel", "ImageRewardScorer", "convert_imagereward",
           "imagereward_state_shapes", "load_bert_tokenizer", "load_imagereward"]
