"""hart_fast: fast, faithful HART text-to-image inference.

    import hart_fast
    images = hart_fast.generate("a red apple")                 # embedded demo model
    pipe = hart_fast.HartPipeline.from_pretrained("hart-0.7b-1024px", device="cuda", dtype="float16")
"""

__version__ = "0.1.0"

from hart_fast.api import GenerationSettings, clear_cache, generate, iter_generate, load_pipeline  # noqa: E402
from hart_fast.config import ConfigError, TokenizerConfig, TransformerConfig  # noqa: E402
from hart_fast.loading import CheckpointError  # noqa: E402
from hart_fast.pipeline import HartPipeline  # noqa: E402

__all__ = [
    "__version__",
    "HartPipeline",
    "generate",
    "iter_generate",
    "load_pipeline",
    "clear_cache",
    "GenerationSettings",
    "TransformerConfig",
    "TokenizerConfig",
    "ConfigError",
    "CheckpointError",
]
