"""FlashForge-HF: shared-prefix decoding for Hugging Face transformers.

``import flashforge_hf`` registers ``attn_implementation="flashforge"`` with transformers and makes plain
``model.generate`` on such models take the FlashForge path (see :mod:`flashforge_hf.generate_hook`).
"""

from . import generate_hook
from .attention import register
from .cache import PrefixSharingCache
from .compat import model_cache_kwarg as cache_kwarg
from .generate_hook import set_generate_hook
from .generation import generate, prefill_shared, prompts_per_batch
from .prefix_tree import Forest, build_forest

register()
generate_hook.install()

__all__ = ["PrefixSharingCache", "Forest", "build_forest", "cache_kwarg", "generate", "prefill_shared", "prompts_per_batch",
           "register", "set_generate_hook"]
__version__ = "0.1.0"
