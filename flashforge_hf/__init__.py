"""FlashForge-HF: shared-prefix decoding for Hugging Face transformers.

``import flashforge_hf`` registers ``attn_implementation="flashforge"`` with transformers.
"""

from .attention import register
from .cache import PrefixSharingCache
from .compat import model_cache_kwarg as cache_kwarg
from .generation import generate, prefill_shared, prompts_per_batch
from .prefix_tree import Forest, build_forest

register()

__all__ = ["PrefixSharingCache", "Forest", "build_forest", "cache_kwarg", "generate", "prefill_shared", "prompts_per_batch", "register"]
__version__ = "0.1.0"
