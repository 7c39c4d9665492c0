"""Weights of a model whose parameters are sharded across ranks (FSDP2, FSDP1, DeepSpeed ZeRO-3).

Under FSDP or ZeRO-3 each rank holds a slice of every parameter. To save the model, the ranks
materialize the full parameters of ONE module at a time with the sharding engine's own
collective (FSDP2: ``DTensor.full_tensor()`` per parameter; FSDP1: ``summon_full_params`` of the
FSDP unit that holds the module, with ``recurse=False``; ZeRO-3: ``deepspeed.zero.GatheredParameters``
on the module's parameters), use them, and free them before the next module. No rank then holds
more than one module (for FSDP1: one FSDP unit, the wrap policy's granularity) beyond its shard.

The collective contract, which every caller must keep:

- Every rank builds a :class:`ShardedModel` of the same model, and enters :meth:`ShardedModel.gathered`
  for the same entries, in the same order, the same number of times. A rank that skips one
  leaves the others waiting in the collective until the process group's timeout. Walk the
  model with :meth:`ShardedModel.entries` (identical order on every rank; :meth:`ShardedModel.check_walk`
  verifies it collectively) and never branch on the rank around a gather.
- The tensors yielded are valid only inside the ``with`` block (FSDP1 frees their storage on
  exit); clone what must outlive it. Never write to them (FSDP1 discards the write).
- No forward or backward pass runs inside the block.

Names are those of the unsharded model: FSDP1's ``_fsdp_wrapped_module``, activation
checkpointing's ``_checkpoint_wrapped_module`` and torch.compile's ``_orig_mod`` segments are
removed, and a DeepSpeed engine is unwrapped to its ``.module``. peft's names
(``base_model.model.``, ``.base_layer``, ``lora_A.<adapter>``) are kept: they are the names the
unsharded peft model has, and the plan's layout step already maps them to checkpoint names.

A bitsandbytes 4-bit weight stored in a float dtype (``bnb_4bit_quant_storage``, what lets FSDP
shard it) comes back as the packed bytes in that dtype. FSDP drops the ``Params4bit`` class; the
yielded tensor is a ``Params4bit`` again (sharing the gathered storage) with the module's
``quant_state``, so a source that reads a live unsharded 4-bit weight reads it unchanged.

:meth:`ShardedModel.materialized` goes one step further for code written for a live model: it
puts the gathered tensors into the modules themselves for the duration of the block, and
:meth:`ShardedModel.placeholders` puts meta tensors of the full shapes there (no collective), so
that code which only needs shapes, dtypes and module kinds (planning a save) runs unchanged.
:meth:`ShardedModel.gathered_rows` materializes a row window of one tensor (a vocabulary-sized head,
a fused MoE expert stack), and :meth:`ShardedModel.holding` keeps FSDP1 units summoned across
several gathers (FSDP1 cannot materialize less than a unit).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from fastsave.errors import ShardingError
from fastsave.parallel import ranks
from fastsave.parallel.engines import ModuleEntry, engine_class, engine_of

_ABSENT = object()  # placeholders(): a key that was not there before

# Name segments that wrappers insert and the unsharded model does not have.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# a name with an empty segment or a wrapper's segment anywhere in it
_NEEDS_CLEANING = re.compile(r"^\.|\.\.|" + "|".join(_WRAPPER_SEGMENTS))


def clean_name(name: str) -> str:
    """``name`` without the segments that FSDP1, activation checkpointing and torch.compile insert."""
    if _NEEDS_CLEANING.search(name) is None:
        return name  # the common case, one regex scan (this runs for every module of the model)
    return ".".join(part for part in name.split(".") if part and part not in _WRAPPER_SEGMENTS)


def unwrap(model: nn.Module) -> nn.Module:
    """The model a save walks: a DeepSpeed engine's ``.module``; anything else unchanged.

    FSDP1 wrappers are kept (their summon needs them); their name segments are removed by
    :func:`clean_name` instead.
    """
    deepspeed = sys.modules.get("deepspeed")  # only a process that trains with DeepSpeed has it
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


def detect_sharding(model: nn.Module) -> str:
    """The name of the engine that shards ``model``'s parameters ("none" when none does).

    Raises:
        ShardingError: more than one engine shards it.
    """
    return engine_class(unwrap(model)).name


class ShardedModel:
    """A model's modules, walked the same way on every rank, and their parameters gathered whole.

    Build one on every rank after wrapping (and after any training step); see the module
    docstring for the collective contract. With :attr:`kind` ``Sharding.NONE`` nothing is
    collective and :meth:`gathered` yields the parameters themselves.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap(model)
        self.engine = engine_of(self.model)
        self._entries = self._walk()
        self._by_name = {entry.name: entry for entry in self._entries}

    @property
    def kind(self) -> str:
        """The name of the engine that shards the model ("none" when none does)."""
        return self.engine.name

    # -- the walk -----------------------------------------------------------------------------

    def _walk(self) -> list[ModuleEntry]:
        entries = []
        seen: set[str] = set()
        for raw_name, module in self.model.named_modules():
            if self.engine.is_wrapper(module):
                continue  # a wrapper: its module is walked under the same clean name
            own = [
                (name, shape, dtype) for name, (shape, dtype) in self.engine.own_parameters(module).items()
            ]
            if not own:
                continue
            name = clean_name(raw_name)
            if name in seen:
                raise ShardingError(f"two modules are both named {name!r} once wrapper names are removed")
            seen.add(name)
            entries.append(
                ModuleEntry(
                    name=name,
                    module=module,
                    parameters=tuple(p for p, _, _ in own),
                    shapes=tuple(s for _, s, _ in own),
                    dtypes=tuple(d for _, _, d in own),
                )
            )
        return entries

    def entries(self) -> list[ModuleEntry]:
        """Every module with parameters of its own, in the model's module order (the same on every rank)."""
        return list(self._entries)

    def entry(self, name: str) -> ModuleEntry:
        """The module named ``name`` in the unsharded model (KeyError if it has no own parameters)."""
        return self._by_name[name]

    def subtree(self, name: str) -> list[ModuleEntry]:
        """The module ``name`` and every module under it that has own parameters, in walk order.

        For a peft LoRA layer this is its base layer and its lora_A/lora_B (lora_embedding_A/B,
        lora_magnitude_vector) of every adapter: what one merged output tensor needs.
        """
        prefix = f"{name}." if name else ""
        return [e for e in self._entries if e.name == name or e.name.startswith(prefix)]

    def lora_layers(self) -> list[str]:
        """Names of the peft LoRA layers (modules that carry adapters), in walk order."""
        from peft.tuners.lora import LoraLayer

        names = []
        for raw_name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and not self.engine.is_wrapper(module):
                names.append(clean_name(raw_name))
        return names

    def walk_signature(self) -> list[tuple]:
        """The modules walked, with their parameters' full shapes and dtypes: identical on every rank."""
        return [(e.name, e.parameters, e.shapes, [str(d) for d in e.dtypes]) for e in self._entries]

    def check_walk(self) -> None:
        """Collectively verify that every rank walks the same modules with the same shapes, in the same order."""
        ranks.check_same_on_all_ranks(
            (self.kind, self.walk_signature()), "the module walk of the sharded model"
        )

    # -- placeholders -------------------------------------------------------------------------

    @contextmanager
    def placeholders(self) -> Iterator[None]:
        """For the block, every module's own parameters are meta tensors of their full shapes and dtypes.

        Not collective, nothing gathered: for code that needs only the unsharded model's structure
        (names, shapes, dtypes, module kinds, tied parameters). A parameter shared by two modules is
        one placeholder under both names; a bitsandbytes 4-bit weight is a ``Params4bit`` on the meta
        device carrying the module's ``quant_state``; FSDP1's flat parameters are hidden. Everything is
        put back on exit, also on error. No forward pass inside the block.
        """
        undo: list[tuple[dict, str, object]] = []  # (mapping, key, previous value or _ABSENT)

        def put(mapping: dict, key: str, value: object) -> None:
            undo.append((mapping, key, mapping.get(key, _ABSENT)))
            if value is _ABSENT:
                mapping.pop(key, None)
            else:
                mapping[key] = value

        try:
            for module in self.model.modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is not None and self.engine.is_hidden(parameter):
                        put(module._parameters, name, _ABSENT)
            made: dict[object, torch.Tensor] = {}
            for entry in self._entries:
                module = entry.module
                for name, shape, dtype in zip(entry.parameters, entry.shapes, entry.dtypes, strict=True):
                    key = self.engine.identity(module, name)
                    placeholder = made.get(key)
                    if placeholder is None:
                        placeholder = made[key] = self._placeholder(module, name, shape, dtype)
                    if name in module.__dict__:  # FSDP1 without use_orig_params: a plain tensor attribute
                        put(module.__dict__, name, _ABSENT)
                    put(module._parameters, name, placeholder)
            yield
        finally:
            for mapping, key, previous in reversed(undo):
                if previous is _ABSENT:
                    mapping.pop(key, None)
                else:
                    mapping[key] = previous

    @staticmethod
    def _placeholder(
        module: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        data = torch.empty(shape, dtype=dtype, device="meta")
        quant_state = getattr(module, "quant_state", None)
        if name == "weight" and quant_state is not None:
            return _as_params4bit(data, quant_state, module)
        return nn.Parameter(data, requires_grad=False)

    # -- gathering ----------------------------------------------------------------------------

    @contextmanager
    def gathered(self, entries: ModuleEntry | Sequence[ModuleEntry]) -> Iterator[dict[str, torch.Tensor]]:
        """Materialize the own parameters of ``entries`` whole on every rank; free them on exit.

        Collective: every rank enters it for the same entries in the same order. Yields
        ``{full name in the unsharded model: full tensor}``. The tensors are valid only inside
        the block and must not be modified.
        """
        if isinstance(entries, ModuleEntry):
            entries = [entries]
        with self.engine.gathered(entries) as tensors:
            yield _with_quant_state(tensors, entries)

    @contextmanager
    def materialized(self, entries: ModuleEntry | Sequence[ModuleEntry]) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`gathered`, with the full tensors also set on the live modules inside the block.

        Code written for an unsharded model (``module.weight``, ``layer.lora_A["default"].weight``)
        then reads whole tensors, unchanged. The sharded parameters are put back on exit, also on
        error. Same collective contract as :meth:`gathered`; no forward pass inside the block.
        """
        if isinstance(entries, ModuleEntry):
            entries = [entries]
        with self.gathered(entries) as tensors:
            swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
            try:
                for entry in entries:
                    for name in entry.parameters:
                        full = tensors[entry.full_name(name)]
                        current = entry.module._parameters.get(name)
                        if current is full or name not in entry.module._parameters:
                            continue
                        if not isinstance(full, nn.Parameter):
                            full = nn.Parameter(full, requires_grad=False)
                        swapped.append((entry.module, name, current))
                        # _parameters directly: FSDP2 swaps its own registrations the same way,
                        # and __setattr__ would refuse replacing a DTensor parameter by a tensor
                        entry.module._parameters[name] = full
                yield tensors
            finally:
                for module, name, original in reversed(swapped):
                    module._parameters[name] = original

    @contextmanager
    def gathered_rows(
        self, entry: ModuleEntry, parameter: str, start: int, stop: int
    ) -> Iterator[torch.Tensor]:
        """Rows ``start:stop`` (dim 0) of one parameter, whole, on every rank; freed on exit.

        For tensors too big to hold whole even once: a vocabulary-sized embedding or head, or a
        fused MoE expert stack (``[experts, ...]``, one expert per row). Under FSDP2's row sharding
        (``Shard(0)`` on a one-dimensional mesh) only the ranks that hold those rows send them
        (one broadcast each), so memory is the window, not the parameter. Other layouts (FSDP1,
        ZeRO-3, other placements) gather the parameter and slice it: correct, without the saving.
        Collective, like :meth:`gathered`; the result is valid inside the block only.
        """
        rows = entry.shapes[entry.parameters.index(parameter)][0]
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"rows {start}:{stop} are outside {entry.full_name(parameter)} ({rows} rows)")
        window = self.engine.row_window(getattr(entry.module, parameter), start, stop)
        if window is not None:
            try:
                yield window
            finally:
                del window
            return
        with self.gathered(entry) as tensors:
            yield tensors[entry.full_name(parameter)][start:stop]

    def holding(self, entries: ModuleEntry | Sequence[ModuleEntry]) -> AbstractContextManager[None]:
        """Keep ``entries`` gathered across the :meth:`gathered` calls inside the block (a context manager).

        FSDP1 can only materialize a whole FSDP unit (the wrap policy's granularity, typically a
        decoder layer), so gathering the modules of one layer one by one summons that layer once
        per module. Holding the layer summons it once: same peak memory, far fewer collectives.
        FSDP2 and ZeRO-3 gather per parameter: there it does nothing. Collective, like
        :meth:`gathered`; may not be nested for the same unit.
        """
        return self.engine.holding([entries] if isinstance(entries, ModuleEntry) else entries)

    def keep_summoned(self, entries: Sequence[ModuleEntry]) -> None:
        """FSDP1: from now on keep exactly the units that hold ``entries`` summoned (collective, like
        :meth:`gathered`); a no-op for other engines. :meth:`release_summoned` ends it."""
        self.engine.keep_summoned(entries)

    def release_summoned(self) -> None:
        """Release every unit :meth:`keep_summoned` kept (local: resharding needs no collective)."""
        self.engine.release_summoned()


def _with_quant_state(
    tensors: dict[str, torch.Tensor], entries: Iterable[ModuleEntry]
) -> dict[str, torch.Tensor]:
    # bitsandbytes keeps a copy of a 4-bit weight's quant_state on the Linear4bit module for
    # exactly this case (FSDP re-creates the weight as a plain tensor); put it back on the tensor.
    for entry in entries:
        quant_state = getattr(entry.module, "quant_state", None)
        if quant_state is None or "weight" not in entry.parameters:
            continue
        name = entry.full_name("weight")
        weight = tensors[name]
        if getattr(weight, "quant_state", None) is None:
            weight = tensors[name] = _as_params4bit(weight, quant_state, entry.module)
        _check_cpu_packing(name, weight, weight.quant_state)
    return tensors


def _as_params4bit(data: torch.Tensor, quant_state, module: nn.Module) -> torch.Tensor:
    """The gathered packed bytes as the ``Params4bit`` an unsharded model holds (no copy)."""
    from bitsandbytes.nn import Params4bit

    return Params4bit(
        data=data,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=quant_state.blocksize,
        compress_statistics=quant_state.nested,
        quant_type=quant_state.quant_type,
        quant_storage=data.dtype,
        module=module,
        bnb_quantized=True,
    )


def _check_cpu_packing(name: str, weight: torch.Tensor, quant_state: object) -> None:
    """Refuse a 4-bit weight whose quant_state says "repacked for CPU" while its data is not.

    On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit weight during its first
    eval-mode forward and rewrites the quant_state in place (absmax un-nested, stored as bf16).
    Under FSDP or ZeRO-3 only the transient unsharded copy is repacked: the shards keep the
    original layout, the shared quant_state does not, and from then on the model computes with
    mismatched data. The original absmax is gone, so the weight cannot be read exactly.
    """
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return
    rows, cols = tuple(quant_state.shape)[-2:]
    if weight.dtype == torch.uint8 and tuple(weight.shape) == (rows, cols // 2):
        return  # data and quant_state agree: repacked before sharding, read as repacked
    raise ShardingError(
        f"{name}: bitsandbytes repacked this 4-bit weight for the CPU (an eval-mode forward on a CPU "
        "with AVX512-BF16) while the sharding engine kept its shards in the original layout, so the "
        "weight and its quant_state no longer match and the model computes wrong outputs. The weight "
        "cannot be read exactly: reload the model and save it without running eval-mode forward "
        "passes on CPU first (train mode, or inputs that require grad, do not repack)."
    )
