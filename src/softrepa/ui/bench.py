"""The model behind `softrepa ui`: load it with its tokens, its form defaults, one job at a time.

Loading is the library's `softrepa.load_model` (the same checks and loader as `softrepa generate`).
Tokens: `--tokens`, else for the bundled SD3 miniature the tokens `softrepa demo` trains (shipped
in the package, `PACKAGED_TOKENS`), else for another miniature a short training with the demo's
recipe on start (`quick_tokens`, cached); a real model needs `--tokens`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import SoftrepaError, UsageError

log = logging.getLogger(__name__)

#: The model and tokens the page opens with: the bundled SD3 miniature and the demo's tokens.
DEFAULT_MODEL = "@assets/toy_sd3"
#: Tokens trained by `softrepa demo`'s SoftREPA arm on the bundled SD3 miniature (recipe
#: toy_sd3, 150 steps), shipped inside the package so that an installed softrepa finds them.
PACKAGED_TOKENS = Path(__file__).resolve().parent / "toy_sd3_tokens.safetensors"
#: Steps of the quick training when a miniature has no tokens (about a minute on 2 CPU cores).
QUICK_TRAIN_STEPS = 30


@dataclasses.dataclass
class Defaults:
    """The values a form opens with for the loaded model.

    Args:
        prompt: an example prompt.
        steps, cfg, size: generation steps, CFG scale and image side.
        max_sequence_length: text length used for generation and editing (the family's `text_length`
            unless `--max-sequence-length` or the miniature recipe says otherwise; None: the family
            takes none).
        edit_steps, src_cfg: FlowEdit steps and source CFG (the family's preset).
        vanilla, tokens: (n_max, target CFG) of each arm (the family's paper presets).
    """

    prompt: str
    steps: int
    cfg: float
    size: int
    max_sequence_length: int | None
    edit_steps: int
    src_cfg: float
    vanilla: tuple[int, float]
    tokens: tuple[int, float]


def is_miniature(model: str) -> bool:
    """Whether a model folder was made by `softrepa toy pretrain` (the world judge applies to it).

    Args:
        model: a model spec (`@assets/...`, folder or hub id).
    """
    from ..pipeline import resolve_model_path

    try:
        return (Path(resolve_model_path(model)).expanduser() / "pretrain.json").is_file()
    except FileNotFoundError:
        return False


def model_defaults(pipe: Any, miniature: bool, max_sequence_length: int | None = None) -> Defaults:
    """Form defaults: the family's paper settings, or the miniature recipe's validation settings.

    Args:
        pipe: the loaded pipeline.
        miniature: use the miniature recipe `toy_<family>` (the settings `softrepa demo` samples with).
        max_sequence_length: an explicit text length (`--max-sequence-length`), else the miniature
            recipe's, else the family's `text_length` (the length train, generate and edit share).
    Raises:
        SoftTokensError: an explicit length for a family that takes none.
    """
    from ..family import family_of
    from ..generate import native_resolution

    family = family_of(pipe)
    length = family.resolve_text_length(max_sequence_length)  # an explicit one is checked here
    edit = family.edit
    common = dict(edit_steps=edit.steps, src_cfg=edit.src_cfg, vanilla=edit.choose(False), tokens=edit.choose(True))
    if miniature:
        from ..config import load_config
        from ..toy.effect import heldout_pair_prompts, sampling_length

        cfg = load_config(f"toy_{family.name}")
        return Defaults(prompt=heldout_pair_prompts()[0], steps=cfg.validation.steps,
                        cfg=cfg.validation.guidance_scale, size=cfg.resolution,
                        max_sequence_length=sampling_length(pipe, cfg) if max_sequence_length is None else length,
                        **common)
    sampling = family.sampling_for(pipe)
    return Defaults(prompt="a red cube on top of a blue sphere", steps=sampling.steps, cfg=sampling.cfg,
                    size=native_resolution(pipe), max_sequence_length=length, **common)


def quick_tokens(pipe: Any, model: str, steps: int = QUICK_TRAIN_STEPS, cache: str | Path | None = None) -> Path:
    """Train tokens for a miniature that has none: the demo's recipe, `steps` steps, cached.

    Args:
        pipe: the loaded miniature.
        model: its model spec (names the cache folder).
        steps: training steps (the demo trains 150).
        cache: cache root (default ~/.cache/softrepa/ui).
    Returns:
        The tokens file (reused on the next start).
    """
    from ..family import family_of
    from ..pipeline import resolve_model_path
    from ..toy.effect import train_arm
    from ..toy.world import export_image_folder

    folder = Path(resolve_model_path(model)).expanduser().resolve()
    key = hashlib.sha256(f"{folder}|{steps}".encode()).hexdigest()[:12]
    out = Path(cache or Path.home() / ".cache" / "softrepa" / "ui") / f"{folder.name}-{key}"
    tokens = out / "train" / "tokens.safetensors"
    if tokens.is_file():
        return tokens
    log.warning("no tokens for %s: training %d steps of the miniature recipe into %s (the demo trains 150)",
                model, steps, out)
    data = out / "data"
    if not (data / "DONE").is_file():
        export_image_folder(data, 500, seed=0, split="train", write_scenes=False)
        (data / "DONE").write_text("ok\n")
    recipe = f"toy_{family_of(pipe).name}"
    return train_arm(pipe, recipe, {"model": str(folder), "max_steps": int(steps)}, data, out / "train")


class Workbench:
    """The loaded model and its tokens; one job at a time.

    Args:
        device, dtype: where the model runs (`--device`, `--dtype`: fp32 / fp16 / bf16 or None).
        max_sequence_length: `--max-sequence-length` (families that take a text length; default: the
            family's, or a miniature recipe's).
        metrics_config: a metrics.yaml whose `lpips` section names LPIPS' weights (None: defaults).
        train_steps: steps of `quick_tokens` when a miniature is loaded without tokens.
        uncond_tokens: what the tokens arm's unconditional CFG branch carries (`--uncond-tokens`:
            "positive", "negative" for an AGSM file's psi-, "none"; see `softrepa.load_into`).
    """

    def __init__(self, device: str | None = None, dtype: str | None = None, max_sequence_length: int | None = None,
                 metrics_config: str | None = None, train_steps: int = QUICK_TRAIN_STEPS,
                 uncond_tokens: str = "positive"):
        self.device, self.dtype, self.msl = device, dtype, max_sequence_length
        self.uncond_tokens = uncond_tokens
        self.metrics_config, self.train_steps = metrics_config, train_steps
        self.pipe: Any = None
        self.handle: Any = None
        self.model = self.tokens = None
        self.miniature = False
        self.defaults: Defaults | None = None
        self._lpips: Any = None
        self._lpips_error: str | None = None
        self.lock = threading.Lock()  # the gradio queue runs one job at a time; API callers too

    # ------------------------------------------------------------------ model
    def load(self, model: str, tokens: str | None = None) -> str:
        """Load `model` with `tokens` (default: the packaged demo tokens for the bundled miniature,
        quick training for another miniature); the previous model stays when this one fails.

        Args:
            model: hub id, local folder or `@assets/toy_sd3`.
            tokens: a tokens `.safetensors`, or None.
        Returns:
            A one-line description of what is loaded.
        Raises:
            FileNotFoundError / SoftrepaError: a one-line reason (the model is not a diffusers folder,
            the tokens do not fit it, no tokens for a real model: `UsageError`).
        """
        from ..artifact import load_into
        from ..loading import check_model, load_model

        model = (model or "").strip() or DEFAULT_MODEL
        tokens = (tokens or "").strip() or None
        check_model(model)  # a folder that is no pipeline is named as such, before the tokens question
        miniature = is_miniature(model)
        if tokens is None and model == DEFAULT_MODEL and PACKAGED_TOKENS.is_file():
            tokens = str(PACKAGED_TOKENS)
        if tokens is None and not miniature:
            raise UsageError(f"no tokens for {model}: give a tokens file (--tokens); only miniatures train on start")
        with self.lock:
            # the library's loader (as `softrepa generate`'s): a bad folder fails before anything heavy
            pipe, handle = load_model(model, tokens=tokens, device=self.device, dtype=self.dtype,
                                      uncond_tokens=self.uncond_tokens)
            if handle is None:
                tokens = str(quick_tokens(pipe, model, self.train_steps))
                handle = load_into(pipe, tokens, uncond_tokens=self.uncond_tokens)
            old = self.handle
            self.pipe, self.handle, self.model, self.tokens, self.miniature = pipe, handle, model, tokens, miniature
            self.defaults = model_defaults(pipe, miniature, self.msl)
            if old is not None:
                old.remove()
        return self.describe()

    def describe(self) -> str:
        """One line: the model, its family, the tokens and the device."""
        if self.pipe is None:
            return "no model loaded"
        from ..family import family_of

        where = f"{self.pipe.device}, {str(self.pipe.dtype).replace('torch.', '')}"
        kind = "miniature, world judge on" if self.miniature else family_of(self.pipe).title
        tokens = "the demo's, packaged" if self.tokens == str(PACKAGED_TOKENS) else self.tokens
        return f"model {self.model} ({kind}; {where}); tokens {tokens}"

    def require(self) -> Any:
        """The pipeline, or a `UsageError` when none is loaded."""
        if self.pipe is None:
            raise UsageError("no model loaded: load one in the Model panel")
        return self.pipe

    # ------------------------------------------------------------------ LPIPS
    def lpips(self) -> tuple[Any, str | None]:
        """(LPIPS scorer or None, the reason it is unavailable); loaded once, never substituted."""
        if self._lpips is None and self._lpips_error is None:
            from ..evaluation import load_metric, load_metrics_config

            try:
                self._lpips = load_metric("lpips", load_metrics_config(self.metrics_config))
            except (SoftrepaError, OSError) as e:  # MetricError, ConfigError, missing weights files
                self._lpips_error = str(e).splitlines()[0]
        return self._lpips, self._lpips_error


__all__ = ["DEFAULT_MODEL", "Defaults", "PACKAGED_TOKENS", "QUICK_TRAIN_STEPS", "Workbench", "is_miniature",
           "model_defaults", "quick_tokens"]
