"""Text prompts: the classes of a model that compares an image with text.

``--prompt "a photo of a cat"`` names one prompt, ``--prompts "a cat,a dog,grass"`` (or
``--prompts @prompts.txt``, one per line) several. The model's plugin turns a model and its prompts
into a classifier whose classes are the prompts (:meth:`attnexplain.plugins.ModelPlugin.with_prompts`);
the rest of attnexplain sees a classifier. This module only reads and checks the prompts (no torch):
they are untrusted text, bounded here before any tokenizer sees them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from ._files import not_a_regular_file
from .errors import AttnExplainError, shown

#: More prompts than this is not a prompt set but a vocabulary (ImageNet's 1,000 classes fit).
MAX_PROMPTS = 4096
#: Characters in one prompt: text towers read at most a few dozen tokens (CLIP 77, SigLIP 64).
MAX_PROMPT_CHARS = 1000
#: A prompts file of MAX_PROMPTS lines of a sentence each is far smaller.
MAX_PROMPTS_FILE_BYTES = 1024 * 1024


class PromptError(AttnExplainError):
    """Prompts that cannot be used: empty, too many, too long, or a file that is not text."""


def read_prompts(prompt: str | None = None, prompts: str | Sequence[str] | None = None) -> tuple[str, ...] | None:
    """The prompts ``--prompt`` (one, taken whole: it may hold commas) or ``--prompts`` (comma-
    separated, ``@FILE`` of one per line, or a sequence of strings) name; None when neither does."""
    if prompt is not None and prompts is not None:
        raise PromptError("Give --prompt (one prompt) or --prompts (several), not both.")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise PromptError(f"A prompt is a string, not {shown(prompt)}.")
        return _checked([prompt], "--prompt")
    if prompts is None:
        return None
    if isinstance(prompts, str):
        if prompts.startswith("@"):
            path = Path(prompts[1:])
            return _checked(_file_lines(path), f"prompts file {path}")
        return _checked(prompts.split(","), "--prompts")
    if not all(isinstance(text, str) for text in prompts):
        raise PromptError(f"Prompts are strings, not {shown(list(prompts))}.")
    return _checked(list(prompts), "prompts")


def _file_lines(path: Path) -> list[str]:
    problem = not_a_regular_file(path)
    if problem is not None:
        raise PromptError(f"Prompts file {path} {problem}.")
    size = path.stat().st_size
    if size > MAX_PROMPTS_FILE_BYTES:
        raise PromptError(
            f"Prompts file {path} is {size:,} bytes; a prompts file holds one short text per line "
            f"(at most {MAX_PROMPTS_FILE_BYTES:,} bytes accepted)."
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PromptError(f"Cannot read prompts file {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PromptError(f"Prompts file {path} is not UTF-8 text (one prompt per line).") from None
    return [line for line in text.splitlines() if line.strip()]


def _checked(texts: list[str], where: str) -> tuple[str, ...]:
    prompts = [" ".join(text.split()) for text in texts]  # runs of whitespace as one space
    if not prompts or not all(prompts):
        raise PromptError(f"{where} holds an empty prompt; give at least one text, e.g. --prompt 'a photo of a cat'.")
    if len(prompts) > MAX_PROMPTS:
        raise PromptError(f"{where} holds {len(prompts):,} prompts; at most {MAX_PROMPTS:,} are accepted.")
    for text in prompts:
        if len(text) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"{where} holds a prompt of {len(text):,} characters ({shown(text, 40)}); "
                f"at most {MAX_PROMPT_CHARS:,} are accepted."
            )
        if any(ord(char) < 32 for char in text):
            raise PromptError(f"{where} holds a prompt with control characters: {shown(text, 40)}.")
    repeated = sorted(text for text, count in Counter(prompts).items() if count > 1)
    if repeated:
        raise PromptError(f"{where} names the prompt {shown(repeated[0])} twice; each prompt is one class.")
    return tuple(prompts)
