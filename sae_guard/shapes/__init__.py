"""ShapesWorld: a procedural text-to-image world with known ground truth; `sae_guard.shapes.scorers` reads it back.

The scorers are not re-exported here, so `python -m sae_guard.shapes.scorers` runs the module only once.
"""

from .world import (
    BACKGROUNDS, COLOURS, PALETTE, SHAPES, ShapesWorld, colour_paraphrases, paraphrase_prompts, render, sample,
    to_tensor,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "PALETTE", "SHAPES", "ShapesWorld", "colour_paraphrases", "paraphrase_prompts",
    "render", "sample", "to_tensor",
]
