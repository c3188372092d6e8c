"""Experiment (not a library feature): `softrepa demo` with extra text-only hard negatives.

Each step appends up to HN_K (env, default 8) captions made by swapping the two colour words,
the two shape words, or the relation word of the batch's two-object captions (negatives that
would name a held-out composition are dropped, so no held-out prompt text reaches training).
E becomes (B, B + K) and the image -> text cross-entropy runs over all columns. It replaces
`Trainer.train_step` for this process only, on the plain (unchunked, single-process) path.

    HN_K=8 python benchmarks/experiment_hard_negatives.py --fresh --out /tmp/exp/hn8 --seeds 100-105

Result on the validation seeds: no gain (benchmarks/demo_time.md, "Choosing the miniature recipe").
"""
import random
import re
import sys
import time
import torch, torch.nn.functional as F
from softrepa import train as T
from softrepa.backbones import TextCond
from softrepa.pairs import PairBatch, error_matrix
from softrepa.toy.world import is_heldout, parse_prompt

COL = r"\b(red|green|blue|yellow)\b"; SHP = r"\b(circle|square|triangle|cross)\b"
REL = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under", "under": "over",
       "higher": "lower", "beneath": "over"}
KMAX = int(__import__("os").environ.get("HN_K", "8"))

def swap2(c, pat):
    m = list(re.finditer(pat, c))
    if len(m) != 2 or m[0].group(1) == m[1].group(1):
        return None
    a, b = m
    return c[:a.start()] + b.group(1) + c[a.end():b.start()] + a.group(1) + c[b.end():]

def negatives(c):
    out = [swap2(c, COL), swap2(c, SHP)]
    words = c.split()
    for i, w in enumerate(words):
        if w in REL and len(re.findall(COL, c)) == 2:
            out.append(" ".join(words[:i] + [REL[w]] + words[i + 1:])); break
    ok = []
    for n in out:
        if not n or n == c: continue
        try:
            if is_heldout(parse_prompt(n)): continue
        except ValueError:
            continue
        ok.append(n)
    return ok

def train_step(self, batch):
    cfg, bb = self.cfg, self.backbone
    t0 = time.perf_counter()
    pb = self._pair_batch(batch, self.step)
    caps = list(pb.captions)
    rng = random.Random(self.step)
    negs = [n for c in caps for n in negatives(c)]
    rng.shuffle(negs); negs = negs[:KMAX]
    if negs:
        with torch.no_grad():
            nc = bb.encode_prompts(negs, resolution=cfg.resolution)
        cond = TextCond.cat([pb.cond, nc])
    else:
        cond = pb.cond
    B = len(caps)
    pb2 = PairBatch(pb.latents, cond, caps + negs, pb.t, pb.noise)
    self.optimizer.zero_grad(set_to_none=True)
    E = error_matrix(bb, pb2)  # (B, B+K)
    tau, scale = cfg.loss.tau, cfg.loss.scale
    logits = scale * torch.exp(-E / tau) if cfg.loss.form == "exp" else -E / tau
    norm = [" ".join(c.split()).casefold() for c in caps + negs]
    mask = torch.tensor([[j != i and norm[j] == norm[i] for j in range(len(norm))] for i in range(B)])
    logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, torch.arange(B))
    loss.backward()
    self.optimizer.step()
    self.step += 1
    if self.step % cfg.schedule.step_every == 0:
        self.scheduler.step()
    acc = float((E[:, :B].argmin(1) == torch.arange(B)).float().mean())
    acc_all = float((E.argmin(1) == torch.arange(B)).float().mean())
    dt = time.perf_counter() - t0
    return {"step": self.step, "loss": float(loss), "i2t": float(loss), "accuracy": acc_all, "acc_inbatch": acc,
            "denoise": float(E.diag().mean()), "t": float(pb.t[0]), "lr": self.optimizer.param_groups[0]["lr"],
            "pairs_per_s": E.numel() / dt, "step_s": dt, "K": len(negs)}

T.Trainer.train_step = train_step
from softrepa.cli import main
sys.exit(main(["demo"] + sys.argv[1:]))
