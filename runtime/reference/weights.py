"""Load a graph's weights from a Hugging Face model directory by `Tensor.source`.

Handles single and sharded safetensors checkpoints (`model.safetensors.index.json`), tied embeddings
(the graph uses one tensor for both, so nothing to do), stacked MoE experts (per-expert checkpoint
tensors, or the already-stacked transformers-5 layout) and LoRA adapters (PEFT init when absent).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from surogate.compiler.ir import Graph, Role
from surogate.compiler.models.resolve import INDEX_ERRORS, WEIGHTS_INDEX, indexed_weight_files, weight_files
from surogate.errors import UserError
from surogate.runtime.reference.dtypes import TORCH_DTYPES
from surogate.runtime.reference.quant import quantize


def _open(path: Path):
    """A safetensors file for reading; a missing, truncated or corrupt one is a UserError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"model: cannot read weights file {path}: {str(exc).splitlines()[0]} (truncated or not a "
                        "safetensors file? re-download the model)") from None


class _Checkpoint:
    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        index = model_dir / WEIGHTS_INDEX
        if index.is_file():
            try:
                files = indexed_weight_files(index)
            except INDEX_ERRORS as exc:
                raise UserError(f"model: {index} is not a safetensors index ({type(exc).__name__}: {exc}); "
                                "re-download the model") from None
        else:
            files = weight_files(model_dir)
            if not files:
                raise UserError(f"model: no safetensors weights in {model_dir}")
        self.handles = {f: _open(model_dir / f) for f in files}
        self.where = {k: f for f, h in self.handles.items() for k in h.keys()}

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header (no data read)."""
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())


def load_weights(graph: Graph, model_dir: str | Path, *, lora_seed: int = 0,
                 adapter_path: str | Path | None = None, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """name -> tensor (cast to its IR dtype) for every base and LoRA weight of `graph`.

    `adapter_path` (a PEFT adapter directory) is merged into the base weights first (W += scale * B @ A),
    before any QLoRA quantization; the graph's own LoRA adapters then start fresh. Checkpoint tensors the graph
    does not use: layers beyond its `num_hidden_layers` are a UserError, others a note appended to `notes`.
    """
    ckpt = checkpoint_reader(model_dir, adapter_path)
    used = used_sources(graph)
    if isinstance(ckpt, _Merged):
        ckpt.check_used(used)
    note = check_unused(used, ckpt)
    if note and notes is not None:
        notes.append(note)
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(lora_seed)
    for name, t in graph.tensors.items():
        if t.attrs.get("amax_history"):
            out[name] = torch.zeros(t.shape, dtype=torch.float32)  # fp8 delayed scaling starts with no history
            continue
        if t.role == Role.QUANT_WEIGHT and t.source is not None:
            out.update(_load_quantized(ckpt, t))
            continue
        if t.role not in (Role.FROZEN_WEIGHT, Role.TRAINABLE_WEIGHT) or t.source is None:
            continue
        dtype = TORCH_DTYPES[t.dtype]
        if "lora" in t.attrs:
            val = ckpt.get(t.source) if ckpt.has(t.source) else _lora_init(t.shape, t.attrs["init"], gen)
        else:
            val = _base_value(ckpt, t)
        if tuple(val.shape) != t.shape:
            raise UserError(f"model: weight {t.source!r} has shape {tuple(val.shape)}, expected {t.shape}")
        out[name] = val.to(dtype)
    return out


class _Merged:
    """A checkpoint view whose base weights have a PEFT adapter merged in, as PEFT's `merge_and_unload` does:
    `W + scale * B @ A` for each LoRA module, and the adapter's whole tensors (`modules_to_save`, trained
    biases) in place of the base's."""

    def __init__(self, base: _Checkpoint, adapter_dir: Path) -> None:
        from surogate.runtime.export import ADAPTER_WEIGHTS
        from surogate.runtime.peft_adapter import load_peft_adapter

        adapter = load_peft_adapter(adapter_dir)
        self.base, self.dir = base, base.dir
        self.deltas = adapter.deltas()
        self.replaced = adapter.replaced
        weights = adapter_dir / ADAPTER_WEIGHTS
        # everything the adapter changes is a weight of the model, of its shape: checked now (headers only),
        # not at the first tensor loaded
        for name, (a, b, _) in self.deltas.items():
            self._check_target(name, (b.shape[0], a.shape[1]), f"LoRA update (B @ A) of {name!r}", weights)
        for name, value in self.replaced.items():
            self._check_target(name, tuple(value.shape), f"tensor {name!r} (modules_to_save)", weights)

    def _check_target(self, name: str, shape: tuple[int, ...], what: str, weights: Path) -> None:
        if not self.base.has(name):
            tied = " (the model ties it to the embedding)" if name == "lm_head.weight" else ""
            raise UserError(f"adapter_path: {weights}: the adapter changes {name!r}, which the model in {self.dir} "
                            f"does not have{tied}: it was trained for another model")
        expected = self.base.shape(name)
        if tuple(shape) != expected:
            raise UserError(f"adapter_path: {weights}: the {what} has shape {tuple(shape)}, the model's weight "
                            f"{expected}: it was trained for another model")

    def check_used(self, used: set[str]) -> None:
        """UserError when the adapter changes a checkpoint tensor the model does not load (a merge that would be
        dropped: e.g. lm_head of a model with tied embeddings)."""
        unused = sorted(n for n in (*self.deltas, *self.replaced) if n not in used)
        if unused:
            tied = " (with tied embeddings the head is the embedding)" if unused[0] == "lm_head.weight" else ""
            raise UserError(f"adapter_path: the adapter changes {unused[0]!r}, which the model in {self.dir} does "
                            f"not use{tied}; its update cannot be merged")

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def names(self) -> list[str]:
        return self.base.names()

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        if name in self.replaced:
            return self.replaced[name].to(w.dtype)
        if name not in self.deltas:
            return w
        a, b, scale = self.deltas[name]
        return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Checkpoint tensors that are no weights of the model: rotary buffers older transformers saved; with tied
# embeddings the head is the embedding (transformers ignores a saved lm_head.weight then, as the graph does).
_NOT_WEIGHTS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^lm_head\.weight$")


def used_sources(graph: Graph) -> set[str]:
    """Every checkpoint tensor name the graph's weights load from (per-expert names of stacked experts included)."""
    used = set()
    for t in graph.tensors.values():
        if t.source is not None:
            used.add(t.source)
        for pattern in t.attrs.get("expert_sources", ()):
            used.update(pattern.format(e=e) for e in range(t.shape[0]))
    return used


def check_unused(used: set[str], ckpt: _Checkpoint | _Merged) -> str | None:
    """Checkpoint tensors the graph does not use (`used`: `used_sources(graph)`). Whole layers beyond the config's
    `num_hidden_layers` mean the config.json does not describe the weights: a UserError. Other unused tensors: a
    note naming the first few (as transformers warns about them)."""
    unused = sorted(n for n in ckpt.names() if n not in used and not _NOT_WEIGHTS.search(n))
    if not unused:
        return None
    layers = [int(m.group(1)) for n in used if (m := _LAYER.match(n))]
    count = max(layers) + 1 if layers else 0
    extra = sorted({int(m.group(1)) for n in unused if (m := _LAYER.match(n)) and int(m.group(1)) >= count})
    if extra:
        first = next(n for n in unused if (m := _LAYER.match(n)) and int(m.group(1)) == extra[0])
        shown = ", ".join(map(str, extra[:8])) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise UserError(f"model: {ckpt.dir} holds weights of layer(s) {shown} (e.g. {first!r}), but its config.json "
                        f"says num_hidden_layers {count}: the config does not describe these weights; fix "
                        "num_hidden_layers (or point `model:` at the folder the config belongs to)")
    shown = ", ".join(repr(n) for n in unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
    return (f"model: {len(unused)} tensor(s) in {ckpt.dir} are not weights of the model its config.json describes "
            f"and were not loaded: {shown}")


def _base_value(ckpt: _Checkpoint, t) -> torch.Tensor:
    """A base weight by its checkpoint name, or stacked from per-expert checkpoint tensors."""
    if ckpt.has(t.source):
        return ckpt.get(t.source)
    if "expert_sources" in t.attrs:
        return _stack_experts(ckpt, t.attrs["expert_sources"], t.shape[0])
    raise UserError(f"model: weight {t.source!r} not found in {ckpt.dir}")


def _load_quantized(ckpt: _Checkpoint, t) -> dict[str, torch.Tensor]:
    """Quantize a base weight at load time (QLoRA): codes into `t.name`, scales into `t.attrs["scales"]`."""
    parts = quantize(t.attrs["format"], _base_value(ckpt, t).float(), t.attrs["block_size"], t.attrs["double_quant"],
                     four_over_six=bool(t.attrs.get("four_over_six")))
    return dict(zip([t.name, *t.attrs["scales"]], parts, strict=True))


def checkpoint_reader(model_dir: str | Path, adapter_path: str | Path | None = None) -> _Checkpoint | _Merged:
    """Tensors of a HF checkpoint by name (`has`, `get`), with a PEFT adapter merged in when given."""
    ckpt = _Checkpoint(Path(model_dir))
    return _Merged(ckpt, Path(adapter_path)) if adapter_path is not None else ckpt


def _lora_init(shape: tuple[int, ...], init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "zeros":
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises lora_A
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _stack_experts(ckpt: _Checkpoint, patterns: tuple[str, ...], n: int) -> torch.Tensor:
    per_expert = []
    for e in range(n):
        names = [p.format(e=e) for p in patterns]
        missing = [m for m in names if not ckpt.has(m)]
        if missing:
            raise UserError(f"model: expert weight {missing[0]!r} not found in {ckpt.dir}")
        per_expert.append(torch.cat([ckpt.get(m) for m in names], dim=0))
    return torch.stack(per_expert)
