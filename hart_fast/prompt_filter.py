"""The prompt-filter hook (`--prompt-filter module:function`), for serve, batch and generate.

The official demo screens prompts with a safety model; hart_fast leaves the policy
to the user: function(prompt) returns None (or True) to accept the prompt, and the
reason (or False) to refuse it.  A refused prompt is an error naming the reason,
before anything is generated: 400 in the HTTP API, a usage error in the CLI.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

PromptFilter = Callable[[str], object]


def load_prompt_filter(spec: Optional[str]) -> Optional[Callable[[str], Optional[str]]]:
    """`module:function` -> function(prompt) returning None (accepted) or the refusal reason."""
    if not spec:
        return None
    if ":" not in spec:
        raise ValueError(f"--prompt-filter must be module:function, got {spec!r}")
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--prompt-filter {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"--prompt-filter {spec!r} is not callable")
    return fn


def check_prompt(prompt_filter, prompt: str) -> Optional[str]:
    """The refusal reason of the filter for prompt, or None."""
    if prompt_filter is None:
        return None
    verdict = prompt_filter(prompt)
    if verdict is None or verdict is True:
        return None
    return "refused by the prompt filter" if verdict is False else str(verdict)


__all__ = ["PromptFilter", "check_prompt", "load_prompt_filter"]
