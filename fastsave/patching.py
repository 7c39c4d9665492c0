"""Give models fastsave's methods: one model (its peft wrapper and inner model together), or all models.

Libraries such as Unsloth bind their own ``save_pretrained_merged`` (and the GGUF methods) on the
model instance, when the model is loaded and again in ``get_peft_model``. An instance attribute
hides a method set on the class, and a later binding replaces an earlier one on the instance, so
neither plain way of patching survives such a library. fastsave therefore puts one *slot* per
method name on ``peft.PeftModel`` and ``transformers.PreTrainedModel``: a data descriptor. Python
asks a class's data descriptor before the instance ``__dict__``, and ``nn.Module.__setattr__``
stores plain values through it, which gives:

- ``fastsave.patch(model)`` *claims* the model (a peft model and the transformers model inside it
  alike); a claimed model, or a peft model whose inner model is claimed, gets fastsave's methods
  whatever another library binds before or after, in either order of ``patch`` and
  ``get_peft_model``;
- what another library bound stays in the instance ``__dict__``, untouched, so
  ``fastsave.unpatch(model)`` gives it back just by releasing the claim;
- for a model nobody claimed the slot is invisible: the instance's own attribute, else the
  class's original, else AttributeError (and peft's ``__getattr__`` forwarding as usual);
- ``fastsave.patch()`` (no argument) gives every model fastsave's methods from the class, also a
  model another library binds its own on, before or after the patch (Unsloth does at every load
  and ``get_peft_model``): the slot answers before the instance ``__dict__``, which keeps those
  bindings for ``fastsave.unpatch()``.

Patching never changes what a model computes: only the four named methods are involved.
"""

from __future__ import annotations

import logging
import types
import weakref
from typing import Any

from torch import nn

from fastsave.methods import METHODS

logger = logging.getLogger(__name__)

_MISSING = object()


_FUNCTIONS = METHODS  # the methods, with Unsloth's signatures (fastsave.methods)
METHOD_NAMES = tuple(_FUNCTIONS)

_claimed: weakref.WeakSet = weakref.WeakSet()  # models fastsave.patch(model) was called on (or found)
_wrapper_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # inner model -> ref to its peft model
_state = {"global": False}
_slots: dict[tuple[type, str], _MethodSlot] = {}


def _inner_models(model: nn.Module) -> list[nn.Module]:
    """The transformers model(s) inside a peft model, read without triggering peft's __getattr__."""
    found = []
    base = model.__dict__.get("_modules", {}).get("base_model")
    if isinstance(base, nn.Module):
        found.append(base)  # prompt-learning peft models wrap the transformers model directly
        inner = base.__dict__.get("_modules", {}).get("model")
        if isinstance(inner, nn.Module):
            found.append(inner)  # LoRA & co: PeftModel -> LoraModel -> transformers model
    return found


def _claim_of(instance: nn.Module) -> nn.Module | None:
    """The model a call on ``instance`` saves, when ``instance`` is claimed (directly or by its inner model)."""
    if instance in _claimed:
        wrapper = _wrapper_of.get(instance)
        return (wrapper() if wrapper is not None else None) or instance
    for inner in _inner_models(instance):
        if inner in _claimed:
            _wrapper_of[inner] = weakref.ref(instance)  # patch(base) before get_peft_model: the wrapper wins
            return instance
    return None


class _MethodSlot:
    """The data descriptor behind one method name on one class (see the module docstring)."""

    def __init__(self, owner: type, name: str) -> None:
        self.name = name
        self.function = _FUNCTIONS[name]
        self.original = owner.__dict__.get(name, _MISSING)

    def __get__(self, instance: nn.Module | None, owner: type) -> Any:
        if instance is None:
            if _state["global"]:
                return self.function
            if self.original is not _MISSING:
                return (
                    self.original.__get__(None, owner) if hasattr(self.original, "__get__") else self.original
                )
            raise AttributeError(self.name)
        target = _claim_of(instance)
        if target is not None:
            return types.MethodType(self.function, target)
        if _state["global"]:  # the class patch reaches every model, also those another library bound
            return types.MethodType(self.function, instance)
        own = instance.__dict__.get(self.name, _MISSING)
        if own is not _MISSING:
            return own
        if self.original is not _MISSING:
            return (
                self.original.__get__(instance, owner) if hasattr(self.original, "__get__") else self.original
            )
        raise AttributeError(self.name)

    def __set__(self, instance: nn.Module, value: Any) -> None:
        # Another library binding its method: kept in the instance __dict__ (unpatch gives it back).
        instance.__dict__[self.name] = value
        if _claim_of(instance) is not None:
            logger.debug("fastsave: %s was bound on a patched model; fastsave's stays in front", self.name)

    def __delete__(self, instance: nn.Module) -> None:
        if instance.__dict__.pop(self.name, _MISSING) is _MISSING:
            raise AttributeError(self.name)


def _patchable_classes() -> list[type]:
    classes = []
    try:
        from peft import PeftModel

        classes.append(PeftModel)
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    from transformers import PreTrainedModel

    classes.append(PreTrainedModel)
    return classes


def _install_slots() -> None:
    for cls in _patchable_classes():
        for name in METHOD_NAMES:
            if (cls, name) not in _slots:
                _slots[(cls, name)] = _MethodSlot(cls, name)
                setattr(cls, name, _slots[(cls, name)])


def _remove_slots_if_unused() -> None:
    if _state["global"] or len(_claimed):
        return
    for (cls, name), slot in list(_slots.items()):
        if cls.__dict__.get(name) is slot:
            if slot.original is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, slot.original)
        del _slots[(cls, name)]


def patch(model: nn.Module | None = None) -> nn.Module | None:
    """Give ``model`` (or, with no argument, every peft and transformers model) fastsave's methods.

    The methods: ``save_pretrained_merged``, ``push_to_hub_merged``, ``save_pretrained_gguf`` and
    ``push_to_hub_gguf``. ``patch(model)`` covers a peft model and the transformers model inside
    it, whichever of the two it is given and whether it is called before or after
    ``get_peft_model``; it wins over another library's methods of the same names, bound before or
    after, and remembers them for :func:`unpatch`. Idempotent; the model computes exactly what it
    did before. Returns the model (None for the class patch).
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"fastsave.patch expects a torch.nn.Module, got {type(model).__name__}")
    _install_slots()
    if model is None:
        _state["global"] = True
        return None
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: patch the model it holds
    _claimed.add(model)
    for inner in _inner_models(model):
        _claimed.add(inner)
        _wrapper_of[inner] = weakref.ref(model)
    return model


def unpatch(model: nn.Module | None = None) -> None:
    """Undo :func:`patch`: for ``model`` (and its inner model), or with no argument the class patch.

    A model gets back whatever it had before: another library's methods bound on it (also those
    bound while it was patched), else none. ``unpatch()`` leaves models patched one by one as they are.
    """
    if model is None:
        _state["global"] = False
    else:
        model = getattr(model, "_orig_mod", model)
        for member in (model, *_inner_models(model)):
            _claimed.discard(member)
            _wrapper_of.pop(member, None)
    _remove_slots_if_unused()
