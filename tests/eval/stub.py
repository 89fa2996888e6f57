"""A word-level tokenizer with a chat template, enough for the task and eval plumbing (no downloads)."""

import torch


class WordTokenizer:
    eos_token_id = 2

    def __init__(self, vocab: int = 97):
        self.vocab, self.words = vocab, {}

    def _id(self, w: str) -> int:
        return self.words.setdefault(w, 3 + len(self.words) % (self.vocab - 3))

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [self._id(w) for w in text.split()]
        ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return type("Encoding", (), {"input_ids": ids})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}> " for m in messages) + "<assistant> "

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids)
