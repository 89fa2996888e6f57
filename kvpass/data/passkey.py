"""Passkey retrieval prompts: a number hidden in long filler text, asked for at the end."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? Answer with the number only."


def needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(tokenizer, n_tokens: int, seed: int = 0, depth: float = 0.5) -> tuple[str, str]:
    """A chat prompt of about ``n_tokens`` tokens hiding a 5-digit passkey at ``depth`` (0 = start,
    1 = end) of the filler; returns ``(prompt, passkey)``."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    intro = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    reps = max(1, (n_tokens - 80) // per)
    at = round(depth * reps)
    text = intro + FILLER * at + needle(key) + FILLER * (reps - at) + "\n" + QUESTION
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return prompt, key
