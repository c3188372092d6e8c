"""The second-generation miniature's text pathway: word tokens, web-like omissions, a frozen CLIP.

The first SD3 miniature read 64 character tokens through text encoders trained jointly with the
denoiser, and its pooled vector carried much of the caption; soft tokens had almost no leverage
on it (docs/effect.md). Real text-to-image models differ on three points, which this module
reproduces at miniature scale:

* **word tokens.** `make_word_tokenizer` is an ordinary `CLIPTokenizer` whose BPE merges build
  every word of the world's captions into one token (`WORLD_WORDS`); any other word still
  tokenizes, into characters, as rare words do in a real CLIP vocabulary. A caption is 6-14 of
  16 positions, as a COCO caption is ~15 of CLIP's 77.
* **web captions leave things out.** `pretrain_common.omit` (beside `web_noise`) drops one
  attribute (a colour, a shape) or the relation from a caption ("a circle to the left of a blue square", "a red circle and a blue
  square"): never a wrong statement, only a less complete one. Pretraining sees a share of
  such captions; SoftREPA then trains on complete ones (SD3: web -> COCO).
* **text encoders pretrained apart and frozen.** `pretrain_text_encoders` trains the two CLIP
  text encoders contrastively against small image encoders on the world's renders (CLIP's
  symmetric InfoNCE with a learned temperature), before and apart from the denoiser, which then
  trains on their frozen features.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .world import COLOURS, PAIR_TEMPLATES, POSITION_PHRASES, RELATION_PHRASES, SHAPES, SINGLE_TEMPLATES

#: Positions of the word-level tokenizer, BOS and EOS included: the longest world caption is 12
#: words (14 tokens); the rest is padding, as in a real CLIP's 77.
WORD_MAX_LENGTH = 16

#: Words the omission captions add (a shape without its name, two objects without a relation).
OMISSION_WORDS = ("shape", "and")


def _world_words() -> tuple[str, ...]:
    texts = list(SINGLE_TEMPLATES) + list(PAIR_TEMPLATES) + [" ".join(COLOURS), " ".join(SHAPES)]
    texts += [p for ps in POSITION_PHRASES.values() for p in ps] + list(POSITION_PHRASES)
    texts += [p for ps in RELATION_PHRASES.values() for p in ps] + list(OMISSION_WORDS) + ["a an"]
    words = set()
    for t in texts:
        words.update(w for w in re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t.lower())))
    return tuple(sorted(words))


#: Every word the world's captions (and the omission captions) use: one token each.
WORLD_WORDS = _world_words()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-()"


def make_word_tokenizer(model_max_length: int = WORD_MAX_LENGTH):
    """A `CLIPTokenizer` in which every world word is a single token (built offline).

    The vocabulary holds the characters (alone and word-final, as CLIP's) plus each world word;
    the merges build each word left to right, so BPE joins exactly the world's words and splits
    anything else into characters.

    Args:
        model_max_length: positions, BOS and EOS included (the pipeline pads to it).
    Returns:
        transformers.CLIPTokenizer.

    Example:
        >>> tok = make_word_tokenizer()
        >>> tok.tokenize("a red circle, left of a square")
        ['a</w>', 'red</w>', 'circle</w>', ',</w>', 'left</w>', 'of</w>', 'a</w>', 'square</w>']
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    chains: dict[str, list[tuple[str, str]]] = {}
    for w in WORLD_WORDS:
        chains[w] = []
        for i in range(1, len(w)):
            right = w[i] + ("</w>" if i == len(w) - 1 else "")
            chains[w].append((w[:i], right))
            vocab.setdefault(w[:i] + right, len(vocab))
    # BPE applies the lowest-ranked merge first, so one word's chain can cut into another's
    # ("half" forms "ha" inside "shape"). Move the chains of words that do not come out whole to
    # the front until all do (deterministic; two passes suffice for this vocabulary).
    order = list(WORLD_WORDS)
    for _ in range(len(order)):
        merges = list(dict.fromkeys(m for w in order for m in chains[w]))
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
        broken = [w for w in order if tok.tokenize(w) != [w + "</w>"]]
        if not broken:
            return tok
        order = broken + [w for w in order if w not in broken]
    raise RuntimeError(f"cannot make {broken} single tokens")  # not reached for the world's words


class ImageEncoder(torch.nn.Module):
    """A small CNN for 32x32 renders: the image tower of the miniature CLIP (discarded after).

    Args:
        dim: output (projection) width, = the text encoder's projection_dim.
        width: channels of the first (stride-2) convolution, doubled twice.
    """

    def __init__(self, dim: int, width: int = 16):
        super().__init__()
        w = width
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, 2, 1), torch.nn.GELU(),           # 16x16
            torch.nn.Conv2d(w, 2 * w, 3, 2, 1), torch.nn.GELU(),       # 8x8
            torch.nn.Conv2d(2 * w, 4 * w, 3, 2, 1), torch.nn.GELU(),   # 4x4
        )
        # position matters (left / right / above): flatten the 4x4 map instead of pooling it
        self.proj = torch.nn.Linear(16 * 4 * w, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) in [-1, 1]
        return self.proj(self.net(x).flatten(1))          # (B, dim)


def pretrain_text_encoders(encoders: list, tokenizer, data, steps: int, batch_size: int = 128,
                           lr: float = 1e-3, omit_share: float = 0.3, seed: int = 0) -> dict:
    """Train CLIP text encoders contrastively against image encoders, then freeze them.

    Each text encoder gets its own image tower (seeded apart, so the two encoders differ, as
    SD3's CLIP-L and CLIP-G do). Per step: a batch of training renders, one caption each (a
    share `omit_share` with something omitted, as in the denoiser's pretraining), symmetric
    InfoNCE between the text encoder's projected EOS embedding (what the pipeline uses as
    `pooled`) and the image embedding, temperature learned from CLIP's 1/0.07.

    Args:
        encoders: `CLIPTextModelWithProjection` modules (trained in place, then frozen).
        tokenizer: the word tokenizer.
        data: `pretrain_common.WorldImages`.
        steps: optimiser steps.
        batch_size: renders per step (in-batch negatives).
        lr: AdamW learning rate (warm-up + cosine).
        omit_share: share of captions with an omission.
        seed: batches, captions and image towers.
    Returns:
        {"steps", "seconds", "loss", "retrieval"}: loss of the last 50 steps, in-batch
        image -> text top-1 accuracy of the last 50 steps.
    """
    from .pretrain_common import TokenCache, lr_factor

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    towers = []
    for k, te in enumerate(encoders):
        torch.manual_seed(seed + 100 + k)
        towers.append(ImageEncoder(te.config.projection_dim))
        te.train().requires_grad_(True)
    scales = torch.nn.Parameter(torch.full((len(encoders),), float(np.log(1 / 0.07))))
    params = [p for m in encoders + towers for p in m.parameters()] + [scales]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, min(100, steps // 10 + 1)))
    tokens = TokenCache(tokenizer)
    losses, accs, t0 = [], [], time.perf_counter()
    for _ in tqdm(range(steps), desc="text encoders", mininterval=5):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        images = data.images(idx)
        ids = tokens(data.captions(idx, rng, 0.0, omit_share=omit_share))
        loss, acc = 0.0, 0.0
        labels = torch.arange(batch_size)
        for te, tower, s in zip(encoders, towers, scales):
            t = F.normalize(te(ids).text_embeds, dim=-1)          # (B, D)
            v = F.normalize(tower(images), dim=-1)                 # (B, D)
            logits = s.clamp(max=np.log(100)).exp() * v @ t.T      # (B images, B captions)
            loss = loss + 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            acc += float((logits.argmax(1) == labels).float().mean()) / len(encoders)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item() / len(encoders))
        accs.append(acc)
    for te in encoders:
        te.eval().requires_grad_(False)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": float(np.mean(losses[-50:])),
            "retrieval": float(np.mean(accs[-50:]))}


__all__ = ["ImageEncoder", "OMISSION_WORDS", "WORD_MAX_LENGTH", "WORLD_WORDS", "make_word_tokenizer",
           "pretrain_text_encoders"]
