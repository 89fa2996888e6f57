"""``kvpass.OnnxEngine``: generation with an exported kvpass model in onnxruntime.

The engine owns the cache tables between steps: it feeds the prompt ``chunk`` tokens at a time,
then one token per step, each time handing the model the tables it returned the step before.
Their size is fixed by the export (``capacity`` slots per layer and KV head), whatever the length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kvpass.export.onnx import layout_of
from kvpass.runtime.plan import plan


class OnnxEngine:
    """An exported model (:func:`kvpass.export_onnx`) in an onnxruntime session.

    ``providers``: onnxruntime execution providers; default CUDA where onnxruntime-gpu sees a GPU,
    else CPU. ``threads``: intra-op threads (default onnxruntime's).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        from kvpass.extras import need

        ort = need("onnxruntime", "An ONNX engine")

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as e:  # onnxruntime's own errors name no file
            raise ValueError(f"onnxruntime cannot load {path}: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map.get("kvpass")
        if meta is None:
            raise ValueError(f"{path} is an ONNX model but not one exported by kvpass (no 'kvpass' metadata)")
        self.meta = json.loads(meta)
        self.layout = layout_of(self.meta)
        self.chunk: int = self.meta["chunk"]
        self.dtype = np.dtype(self.meta["dtype"])
        self.table_names = self.layout.names()
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def capacity(self) -> int:
        """Slots per layer and KV head (sliding-window layers may hold fewer)."""
        return max(self.layout.capacity)

    def new_cache(self, batch: int) -> list[np.ndarray]:
        """Empty tables for ``batch`` sequences, in the model's input order."""
        return [t.numpy() for t in self.layout.empty(batch, getattr(torch, self.meta["dtype"]))]

    def cache_bytes(self, batch: int = 1) -> int:
        """Bytes of the tables for ``batch`` sequences (keys and values, positions, scores, flags, owners)."""
        return sum(t.nbytes for t in self.new_cache(batch))

    def step(self, input_ids: np.ndarray, positions: np.ndarray, tables: list[np.ndarray]):
        """One call of the model: ``(logits [B, 1, V] of the last column, new tables)``."""
        feeds = {"input_ids": input_ids, "positions": positions, **dict(zip(self.table_names, tables, strict=True))}
        logits, *tables = self.session.run(self.output_names, feeds)
        return logits, tables

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 32,
        *,
        attention_mask=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Prompt ``input_ids [B, T]`` (left-padded where ``attention_mask`` is 0) followed by up to
        ``max_new_tokens`` tokens, greedy or sampled (``temperature``, ``top_k``, ``seed``). Rows
        that produced ``eos_token_id`` keep producing it."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {ids.shape}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        B, T = ids.shape
        mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if not self.meta["evicts"] and int(mask.sum(1).max()) + max_new_tokens > min(self.layout.capacity):
            raise ValueError(
                f"this engine keeps every token ({self.meta['policy']!r}) in {min(self.layout.capacity)} slots: a "
                f"{int(mask.sum(1).max())}-token prompt and {max_new_tokens} new tokens do not fit; export it with a "
                "larger capacity"
            )
        pos = np.where(mask, mask.cumsum(1) - 1, -1)
        lengths = mask.sum(1)
        tables = self.new_cache(B)
        rng = np.random.default_rng(seed)
        logits = None
        for start, end, *_ in plan(T, self.chunk):  # (the model branches on the span's mode: its length)
            logits, tables = self.step(ids[:, start:end], pos[:, start:end], tables)
        out, done = [ids], np.zeros(B, dtype=bool)
        for i in range(max_new_tokens):
            nxt = self._choose(logits[:, -1].astype(np.float64), do_sample, temperature, top_k, rng)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if (eos_token_id is not None and done.all()) or i == max_new_tokens - 1:
                break
            logits, tables = self.step(nxt[:, None], lengths[:, None] + i, tables)
        return np.concatenate(out, axis=1)

    @staticmethod
    def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None, rng) -> np.ndarray:
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1]), None]
            logits = np.where(logits < kth, -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p])
