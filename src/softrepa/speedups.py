"""Speed options of the training step (`speed:` in a recipe, `--speed.<name>` on `softrepa train`).

Every option is off by default: each changes the arithmetic of the frozen model's forward and
backward, and none is on until `benchmarks/speed_precision.py` has shown on a GPU that its token
gradients stay within the acceptance rule of issue 25 (gradient cosine >= 0.999 against the bf16
eager step, trained tokens within the bf16-vs-fp32 spread). The CPU tests cover what a CPU can
run: option validation, the refusal of what the device lacks, and that the attention context
reaches the step.

* `attention`: the scaled-dot-product-attention backend of the step ("auto": torch's choice;
  "flash", "efficient", "cudnn", "math"), applied with `torch.nn.attention.sdpa_kernel` around the
  step's forward and backward. Nothing of the model changes: diffusers' attention processors call
  `F.scaled_dot_product_attention`, whose dispatcher reads the flags the context sets.
* `fp8`: float8 matmuls (torchao's `Float8Linear`, tensor-wise dynamic scales) for the frozen
  denoiser's `nn.Linear` layers, CUDA compute capability >= 8.9 only. This one has to replace
  modules: a forward hook sees a layer's input and output but cannot change the matmul between
  them, and a pre-hook that quantised the input would still leave the bf16 GEMM. So the trainer
  swaps the eligible layers for the run (`convert_fp8`) and puts the originals back when
  `Trainer.train` returns; the weights themselves are shared, never copied or changed.

CUDA graphs are not an option: `CompileConfig` refuses the CUDA-graph compile modes because the
token hooks build new tensors (the prepended text) on every call, which a captured graph would
replay from stale storage; see docs/benchmarks.md.

Example:
    >>> speed = SpeedConfig(attention="math")
    >>> check_speed(speed, torch.device("cpu"), half=False)        # raises if this device lacks it
    >>> with attention_backend(speed.attention):
    ...     loss = objective_backward(backbone, batch, objective)
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError, MissingDependencyError

#: attention option -> name of the `torch.nn.attention.SDPBackend` member (None: no context)
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                      "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
#: float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
FP8_MIN_CAPABILITY = (8, 9)


@dataclass
class SpeedConfig:
    """Speed options of the training step; all off by default (see the module docstring).

    Args:
        attention: SDPA backend of the step: "auto" (torch's choice), "flash", "efficient",
            "cudnn" or "math". On a CPU torch has "math" and its own flash kernel; "efficient"
            and "cudnn" need CUDA (refused before the model loads).
        fp8: float8 matmuls for the frozen denoiser's linear layers through torchao
            (`pip install 'softrepa[fp8]'`), CUDA compute capability >= 8.9 only.

    Example:
        >>> SpeedConfig(attention="cudnn", fp8=True)       # or --speed.attention cudnn --speed.fp8 true
    """

    attention: str = "auto"
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"speed.attention must be one of {'|'.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention!r}")

    def describe(self) -> str:
        """"attention cudnn + fp8", or "default" when every option is off."""
        parts = ([] if self.attention == "auto" else [f"attention {self.attention}"]) + (["fp8"] if self.fp8 else [])
        return " + ".join(parts) or "default"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of `device` (a function so that tests can stand in for a GPU)."""
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def check_attention(name: str, device: torch.device, half: bool) -> None:
    """Refuse an attention backend that cannot run on `device`, in one line naming the option.

    Args:
        name: a key of `ATTENTION_BACKENDS`.
        device: the device the step runs on.
        half: the attention inputs are fp16 / bf16 (flash and cuDNN attention need that on CUDA).
    Raises:
        ConfigError: "speed.attention: ..." with what the device lacks and what works instead.
    """
    SpeedConfig(attention=name)  # validates the name
    if name in ("auto", "math"):
        return
    where = f"this run's device is {device}"
    if device.type != "cuda":
        if device.type == "cpu" and name == "flash":
            return  # torch's CPU flash kernel (fp32 / bf16); "auto" picks it too
        ok = "auto or math" + (" (or flash)" if device.type == "cpu" else "")
        raise ConfigError(f"speed.attention: {name!r} needs a CUDA GPU ({where}); use {ok}")
    major, minor = _capability(device)
    if name == "efficient":
        return  # memory-efficient attention runs on every CUDA GPU torch supports, fp32 included
    if (major, minor) < (8, 0):
        raise ConfigError(f"speed.attention: {name!r} needs compute capability >= 8.0 ({where}, "
                          f"capability {major}.{minor}); use auto, efficient or math")
    if name == "flash" and not torch.backends.cuda.is_flash_attention_available():
        raise ConfigError(f"speed.attention: 'flash' is not built into this torch ({torch.__version__}); use auto")
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        raise ConfigError("speed.attention: 'cudnn' needs cuDNN, which this torch does not find; use auto")
    if not half:
        raise ConfigError(f"speed.attention: {name!r} runs in fp16 / bf16 only; train with mixed_precision "
                          "bf16 (or weights_dtype bf16), or use auto / efficient")


def check_fp8(device: torch.device) -> None:
    """Refuse `speed.fp8` where it cannot run: not CUDA, capability < 8.9, torchao missing.

    Raises:
        ConfigError: the device has no float8 tensor cores (one line naming speed.fp8).
        MissingDependencyError: torchao is not installed (names `pip install torchao`).
    """
    if device.type != "cuda":
        raise ConfigError(f"speed.fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
                          f"this run's device is {device}")
    cap = _capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise ConfigError(f"speed.fp8 needs compute capability >= 8.9 (float8 tensor cores); {device} has "
                          f"{cap[0]}.{cap[1]}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("speed.fp8 needs torchao: pip install torchao (or pip install "
                                     f"'softrepa[fp8]'); import failed: {e}") from e


def check_speed(speed: SpeedConfig, device: torch.device, half: bool) -> None:
    """Every check of `speed` against `device`; the trainer calls it before the model loads.

    Args:
        speed: the run's `SpeedConfig`.
        device: the device the step runs on.
        half: the step computes in fp16 / bf16 (mixed precision or half weights).
    Raises:
        ConfigError / MissingDependencyError: one line naming the option.

    Example:
        >>> check_speed(SpeedConfig(attention="cudnn"), torch.device("cpu"), half=False)
        Traceback (most recent call last):
        softrepa.errors.ConfigError: speed.attention: 'cudnn' needs a CUDA GPU (...); use auto or math (or flash)
    """
    check_attention(speed.attention, device, half)
    if speed.fp8:
        check_fp8(device)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run the block's SDPA calls (forward and backward) on backend `name` ("auto": unchanged).

    A call the backend cannot serve (an unsupported head size, dtype or mask) becomes a one-line
    `ConfigError` naming the option instead of torch's multi-line warning list.

    Example:
        >>> with attention_backend("math"):
        ...     loss.backward()
    """
    member = ATTENTION_BACKENDS[SpeedConfig(attention=name).attention]
    if member is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(getattr(SDPBackend, member)):
            yield
    except RuntimeError as e:
        if "No viable backend" not in str(e) and "No available kernel" not in str(e):
            raise
        raise ConfigError(f"speed.attention: {name!r} cannot run this model's attention here "
                          f"({str(e).splitlines()[0][:120]}); use auto") from e


def fp8_eligible(module: nn.Module) -> bool:
    """An `nn.Linear` (exactly: no subclass such as a LoRA wrapper) whose dimensions float8 GEMMs
    take (multiples of 16) and that carries no hook a swap would drop."""
    return (type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and not (module._forward_hooks or module._forward_pre_hooks))


class Float8Swap:
    """The denoiser's eligible `nn.Linear` layers swapped for torchao `Float8Linear` ones.

    `remove()` puts the original modules back (the same objects, so the model is exactly the one
    before); `apply()` installs the same float8 modules again (no new objects: compiled code keeps
    its cache). The weights are shared by both, never copied.
    """

    def __init__(self, model: nn.Module, originals: dict[str, nn.Module], converted: dict[str, nn.Module]):
        self.model, self.originals, self.converted = model, originals, converted
        self.active = True

    def _install(self, modules: dict[str, nn.Module]) -> None:
        for fqn, module in modules.items():
            parent, _, name = fqn.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, name, module)

    def remove(self) -> None:
        """The original `nn.Linear` modules again."""
        self._install(self.originals)
        self.active = False

    def apply(self) -> None:
        """The float8 modules again (after `remove`)."""
        self._install(self.converted)
        self.active = True

    def __enter__(self) -> "Float8Swap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.converted)


def convert_fp8(model: nn.Module) -> Float8Swap:
    """Swap `model`'s eligible linear layers for torchao float8 ones (not yet measured on a GPU:
    `benchmarks/speed_precision.py` is the check; see docs/benchmarks.md, issue 25).

    Args:
        model: the frozen denoiser (the trainer's `backbone.denoiser`).
    Returns:
        A `Float8Swap`; `.remove()` restores the original modules.
    Raises:
        MissingDependencyError: torchao is not installed.

    Example:
        >>> with convert_fp8(pipe.transformer):           # training steps here
        ...     objective_backward(backbone, batch, objective)
    """
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise MissingDependencyError(f"speed.fp8 needs torchao: pip install torchao ({e})") from e
    originals = {fqn: m for fqn, m in model.named_modules() if fqn and fp8_eligible(m)}
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in originals)
    converted = {fqn: model.get_submodule(fqn) for fqn in originals}
    return Float8Swap(model, originals, converted)


__all__ = ["ATTENTION_BACKENDS", "Float8Swap", "SpeedConfig", "attention_backend", "check_attention", "check_fp8",
           "check_speed", "convert_fp8", "fp8_eligible"]
