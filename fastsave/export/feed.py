"""GGUF straight from the merge: llama.cpp's converter reads fastsave's merged tensors, no checkpoint.

llama.cpp's ``convert_hf_to_gguf.py`` reads a model's tensors through one hook: its model class's
``index_tensors()`` returns ``{name: callable giving the tensor}`` (its own remote mode fills it
with tensors that are not in local files). Here the converter runs in this process, its model
class (chosen by llama.cpp for the architecture, as its own ``main`` chooses it) is subclassed to
fill that dict from fastsave's plan: each entry a lazy tensor of the planned name, shape and dtype
that runs the plan item's producer when the converter writes it. The values are the very tensors
the 16-bit checkpoint would hold, so the GGUF is the one the checkpoint route writes; but only
config.json and the tokenizer files are staged on disk, and the converter holds one tensor at a
time. Every model-specific step (name mapping, permutations, the vocabulary) stays llama.cpp's.

When the llama.cpp at hand has other internals (no ``index_tensors``/``filter_tensors``, no lazy
tensor with ``meta_with_dtype_and_shape``, an ``__init__`` without ``hparams``, another ``gguf``
package already imported), :class:`FeedUnavailable` says why and the export falls back to the
checkpoint route, with a log line.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fastsave.errors import FeedUnavailable
from fastsave.export.llama_cpp import LlamaCpp
from fastsave.io.finite import check_finite
from fastsave.plan.items import Plan

logger = logging.getLogger(__name__)

# the converter's own outtype names
FED_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _converter(tools: LlamaCpp) -> Any:
    """llama.cpp's ``conversion`` package from ``tools.root``, checked for what the feed uses."""
    gguf_py = str(tools.gguf_py) if tools.gguf_py is not None else None
    loaded = sys.modules.get("gguf")
    if loaded is not None and gguf_py is not None:
        where = str(Path(getattr(loaded, "__file__", "") or "").resolve())
        if not where.startswith(str(Path(gguf_py).resolve())):
            raise FeedUnavailable(f"another gguf package ({where}) is already imported in this process")
    if gguf_py is not None and gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)  # the converter's gguf, as load_gguf reads the result with it
    loaded_conversion = sys.modules.get("conversion")
    if loaded_conversion is not None:
        where = Path(getattr(loaded_conversion, "__file__", "") or "").resolve()
        if not str(where).startswith(str(Path(tools.root).resolve())):
            raise FeedUnavailable(
                f"another llama.cpp's conversion package ({where.parent}) is already imported"
            )
    root_added = str(tools.root) not in sys.path
    if root_added:  # only to import llama.cpp's `conversion` package; its folders must not shadow others
        sys.path.insert(0, str(tools.root))
    try:
        conversion = importlib.import_module("conversion")
    except Exception as error:  # any failure means: the checkpoint route instead
        raise FeedUnavailable(f"llama.cpp's conversion package does not import here ({error})") from None
    finally:
        if root_added and str(tools.root) in sys.path:
            sys.path.remove(str(tools.root))  # the package knows its own folder from here on
    needed = ("ModelBase", "ModelType", "get_model_architecture", "get_model_class", "LazyTorchTensor")
    missing = [name for name in needed if not hasattr(conversion, name)]
    base = getattr(conversion, "ModelBase", None)
    missing += [
        f"ModelBase.{m}"
        for m in ("index_tensors", "filter_tensors", "load_hparams", "write")
        if not hasattr(base, m)
    ]
    lazy = getattr(conversion, "LazyTorchTensor", None)
    if lazy is not None and not hasattr(lazy, "meta_with_dtype_and_shape"):
        missing.append("LazyTorchTensor.meta_with_dtype_and_shape")
    if base is not None and "hparams" not in inspect.signature(base.__init__).parameters:
        missing.append("ModelBase(hparams=...)")
    if missing:
        raise FeedUnavailable(f"llama.cpp's converter at {tools.root} has no {', '.join(missing)}")
    return conversion


def convert_from_plan(
    tools: LlamaCpp, staged: Path, plan: Plan, outfile: Path, outtype: str, split_max_size: int = 0
) -> float:
    """Write ``outfile`` (``outtype``: f32, f16, bf16 or q8_0) from the plan's tensors, with
    ``staged`` holding config.json and the tokenizer files; returns the seconds.

    Raises:
        FeedUnavailable: this llama.cpp cannot be fed (before anything is written).
        GGUFConversionError: the converter failed.
    """
    from fastsave.errors import GGUFConversionError

    conversion = _converter(tools)
    import gguf
    import torch

    ftypes = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    lazy_tensor = conversion.LazyTorchTensor
    items = checkpoint_order(plan)

    def produce(item: Any) -> Any:
        tensor = item.produce()
        check_finite(tensor, item.name)  # as the shard writer checks every tensor it writes
        return tensor

    try:
        hparams = conversion.ModelBase.load_hparams(staged, False)
        architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
        model_class = conversion.get_model_class(architecture)
    except Exception as error:
        raise GGUFConversionError(f"llama.cpp's converter cannot convert this model: {error}") from error

    class FromPlan(model_class):  # the converter's own class for the architecture, fed from the plan
        model_arch = model_class.model_arch  # llama.cpp checks subclasses declare it

        def index_tensors(self, remote_hf_model_id: str | None = None) -> dict[str, Any]:
            tensors: dict[str, Any] = {}
            for item in items:
                meta = lazy_tensor.meta_with_dtype_and_shape(item.dtype, tuple(item.shape))

                def make(item: Any = item, meta: Any = meta) -> Any:
                    return lazy_tensor(meta=meta, args=(item,), func=produce)

                if titem := self.filter_tensors((item.name, make)):
                    name, generator = titem
                    tensors[name] = generator
            return tensors

    started = time.perf_counter()
    environment = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with _environment(environment), torch.inference_mode():
        try:
            model = FromPlan(
                staged,
                ftypes[outtype],
                outfile,
                eager=False,
                hparams=hparams,
                split_max_size=split_max_size,
            )
            model.write()
        except Exception as error:
            raise GGUFConversionError(
                f"llama.cpp's converter failed on the merged tensors: {error}"
            ) from error
    return time.perf_counter() - started


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def checkpoint_order(plan: Plan) -> list[Any]:
    """The plan's items in the order the converter meets them in the 16-bit checkpoint: shard by
    shard as the writer cuts them, by name within a shard (llama.cpp sorts a file's tensors by
    name), so that the fed GGUF is the checkpoint route's, byte for byte."""
    from fastsave.io.shards import assign_shards
    from fastsave.options import SaveOptions

    shards = assign_shards(plan.items, SaveOptions.max_shard_size)
    return [item for shard in shards for item in sorted(shard.tensors, key=lambda item: item.name)]


def feed_unavailable_reason(tools: LlamaCpp) -> str | None:
    """Why this llama.cpp's converter cannot be fed from the plan, or None when it can."""
    try:
        _converter(tools)
    except FeedUnavailable as why:
        return str(why)
    return None
