"""llmkd: distil a pretrained language model into a small, fast two-tower recommender.

`from llmkd import Recommender` loads the serving API on first use: `import llmkd` alone imports
neither torch nor faiss.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Recommender":
        from llmkd.serving.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'llmkd' has no attribute {name!r}")
