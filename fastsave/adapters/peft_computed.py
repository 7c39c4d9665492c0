"""Tuners whose transform fastsave takes from peft's own layer, then folds in by its own arithmetic.

For these tuners peft's ``get_delta_weight`` is a computation over the adapter's tensors alone
(a Fourier or wavelet transform, a sparse scatter, a butterfly of rotations, a Householder
chain): it is
called on the live layer, under no_grad, with every adapter tensor in float32 (peft's default
``autocast_adapter_dtype``), so that it computes exactly what peft computes in a float32 merge. A
layer whose adapter tensors are kept in another dtype is refused, because there peft's own
computation would round in that dtype first.

How each folds in (peft's merge):

* added to W (FourierFT (transposed with fan_in_fan_out), SHiRA, VBLoRA, RandLoRA, GraLoRA, PEANuT,
  WaveFT; C3A from peft's circulant helper in float32, because its own delta is rounded to the base
  weight's dtype): the delta is a whole matrix: the whole-matrix path;
* W multiplied on the right: OFT ``mm(R, W.T).T``, BOFT the same times ``boft_s``, HRA
  ``mm(W, H)``: rows of W are transformed alone, streamed where the BLAS gives blocks of the product
  the whole product's bits (checked per shape).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastsave.adapters.delta import TunerDelta
from fastsave.adapters.tuner_reading import Fetch, LayerFacts, refuse, refuse_unless_linear
from fastsave.adapters.variants import BlockwiseCheck, DeltaRows, Variant

TITLES = {
    "fourierft": "FourierFT",
    "shira": "SHiRA",
    "vblora": "VBLoRA",
    "randlora": "RandLoRA",
    "c3a": "C3A",
    "oft": "OFT",
    "boft": "BOFT",
    "hra": "HRA",
    "deft": "DeFT",
    "delora": "DeLoRA",
    "frod": "FRoD",
    "gralora": "GraLoRA",
    "hira": "HiRA",
    "lily": "Lily",
    "osf": "OSF",
    "peanut": "PEANuT",
    "psoft": "PSOFT",
    "pvera": "PVeRA",
    "supertuning": "SuperTuning",
    "tinylora": "TinyLoRA",
    "unilora": "UniLoRA",
    "waveft": "WaveFT",
}

# the tuners here, and how their transform folds in
ADDED = ("fourierft", "shira", "vblora", "randlora", "c3a", "gralora", "peanut", "waveft")
RIGHT = ("oft", "boft", "hra")
TUNERS = ADDED + RIGHT

_NOT_REPRODUCED = (
    "peft computes this tuner's delta from the base weight or in the base weight's dtype, so peft's own "
    "computation does not give its float32 merge bit for bit (checked against peft 0.21), and fastsave has no "
    "exact arithmetic of its own for it yet"
)
# peft tuners with layers that fastsave refuses, and why
REFUSED = {
    **dict.fromkeys(
        ("deft", "delora", "frod", "hira", "osf", "psoft", "pvera", "supertuning", "tinylora", "unilora"),
        _NOT_REPRODUCED,
    ),
    # not a gap to fill: Lily has no weight to merge into (checked against peft 0.21's forward)
    "lily": "Lily's update is not a fixed weight: its router mixes the B experts by probabilities averaged over "
    "each forward's own tokens, so no merged weight computes what the trained model computes (peft refuses "
    "to merge it as well)",
    "miss": "MiSS's delta is a function of the base weight itself; fastsave has no exact arithmetic for it yet",
    "road": "RoAd rotates pairs of output rows and the bias together; fastsave has no exact arithmetic for it yet",
    "ln_tuning": "LN tuning swaps in trained copies of whole normalisation layers rather than a delta on a weight; "
    "fastsave does not merge it yet",
}

# peft layers over bitsandbytes whose own delta computation fails (checked against peft 0.21)
BROKEN_OVER_BITSANDBYTES = {
    "randlora": "peft's RandLoRA layer over a bitsandbytes weight cannot compute its own delta (its bases "
    "are sliced for the packed weight), so there is no merge to reproduce",
}


class AddedVariant(Variant):
    """peft's whole delta, added (the maths needs the whole matrix: computed by peft at once)."""

    name = "peft delta, added"

    def dense(self, delta: TunerDelta, device: torch.device | str) -> torch.Tensor:
        return _computed(delta).to(device)

    def by_rows(self, delta: TunerDelta) -> bool:
        return False

    def rows(self, delta, step, check):
        return None


class RightVariant(Variant):
    """W times a transform on its input side: OFT and BOFT ``mm(R, W.T).T`` (BOFT then ``* s``),
    HRA ``mm(W, H)``; by rows."""

    name = "peft transform, on the input side"

    def dense(
        self, delta: TunerDelta, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        matrix, scale = _computed(delta)
        return matrix.to(device), None if scale is None else scale.to(device)

    def rows(self, delta: TunerDelta, step: int, check: BlockwiseCheck) -> DeltaRows | None:
        matrix, scale = self.dense(delta, "cpu")
        n_rows = int(delta.setting("rows"))
        sample = torch.randn(n_rows, matrix.shape[0], generator=torch.Generator().manual_seed(0))
        if delta.setting("form") == "left of W.T":
            exact = check.product(matrix, sample.T, step, columns=True)
        else:
            exact = check.product(sample, matrix, step)
        if not exact:
            return None
        if scale is None or scale.shape[0] == 1:
            return lambda i, j: (matrix, scale)
        return lambda i, j: (matrix, scale[i:j])  # BOFT's scale is one a row

    def fold(self, delta, base, current, dense, rows=None):
        matrix, scale = dense
        if delta.setting("form") == "left of W.T":
            out = torch.mm(matrix, current.T).T
        else:
            out = torch.mm(current, matrix)
        return out * scale if scale is not None else out


ADDED_VARIANT = AddedVariant()
RIGHT_VARIANT = RightVariant()


def _computed(delta: TunerDelta):
    with torch.no_grad():
        return delta.setting("compute")()


def reader(tuner: str) -> Callable[[torch.nn.Module, str, LayerFacts, Fetch], TunerDelta]:
    """The reader of ``tuner``'s layers."""

    def read(layer: torch.nn.Module, adapter: str, facts: LayerFacts, fetch: Fetch) -> TunerDelta:
        title = TITLES[tuner]
        refuse_unless_linear(layer, facts, title)
        if tuner in BROKEN_OVER_BITSANDBYTES and type(layer).__module__.endswith(".bnb"):
            refuse(facts, title, BROKEN_OVER_BITSANDBYTES[tuner])
        tensors = {}
        for holder_name in type(layer).adapter_layer_names:
            holder = getattr(layer, holder_name)
            if adapter not in holder:
                continue
            item = holder[adapter]
            if isinstance(item, torch.nn.Module):  # OFT keeps its rotation in a module
                tensors.update({f"{holder_name}.{key}": value for key, value in item.named_parameters()})
            else:
                tensors[holder_name] = fetch(holder, adapter, holder_name)
        kept = sorted({str(t.dtype) for t in tensors.values() if t.dtype != torch.float32})
        if kept:
            refuse(
                facts,
                title,
                f"its tensors are kept in {', '.join(kept)} and fastsave takes this tuner's transform from peft, "
                "which would compute it in that dtype; keep the adapter in float32 (peft's default)",
            )
        settings = {"compute": _compute(tuner, layer, adapter, facts), "rows": facts.base_shape[0]}
        if tuner in ADDED:
            return TunerDelta(adapter, ADDED_VARIANT, tensors, settings=settings)
        settings["form"] = "right of W" if tuner == "hra" else "left of W.T"
        return TunerDelta(adapter, RIGHT_VARIANT, tensors, settings=settings)

    return read


def _compute(tuner: str, layer: torch.nn.Module, adapter: str, facts: LayerFacts) -> Callable[[], object]:
    """peft's own computation of the transform, as its merge uses it."""
    if tuner == "fourierft":
        fan_in_fan_out = facts.fan_in_fan_out

        def fourier() -> torch.Tensor:
            delta = layer.get_delta_weight(adapter)
            return delta.T if fan_in_fan_out else delta

        return fourier
    if tuner == "c3a":  # peft's own delta is cast to the base weight's dtype; the float32 merge's is not
        from peft.tuners.c3a.utils import get_circulant_fast

        in_features = facts.base_shape[1]
        return lambda: get_circulant_fast(layer.c3a_kernel[adapter].to(torch.float32)) / in_features
    if tuner in ("oft", "hra"):  # the transform alone (BOFT's comes with its scale already)
        return lambda: (layer.get_delta_weight(adapter), None)
    return lambda: layer.get_delta_weight(adapter)
