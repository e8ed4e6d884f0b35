"""Measuring images: `judge` (scene attributes from pixels alone) and `quality`
(a model's prompt adherence on scene prompts, scored by the judge)."""
