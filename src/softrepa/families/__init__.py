"""The built-in model families, one module each; importing this package registers them.

Adding a family: write `families/<name>.py` — a `Family` subclass with its `Placement` (one of the
three templates of `softrepa.templates`, configured by data), its `Backbone` (a `FlowBackbone` for
flow-matching models) and its defaults, ending with `register_family(...)` — and add its import
below. See docs/design-notes.md.
"""

from . import sd3  # noqa: F401  (registration, in this order: `family_names()` lists them so)
from . import flux  # noqa: F401
from . import unet  # noqa: F401  (sd15, sdxl)
from . import qwenimage  # noqa: F401
from . import flux2  # noqa: F401
from . import sana  # noqa: F401
from . import wan  # noqa: F401
from . import zimage  # noqa: F401
from . import qwenimage21  # noqa: F401
from . import flux3  # noqa: F401

__all__: list[str] = []
