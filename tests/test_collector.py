"""Python's collector during a save: the objects from before it are left out of every collection
while it runs, and given back to the collector when it ends, whatever the way it ends."""

from __future__ import annotations

import gc
import weakref

import pytest

import fastsave
from fastsave.pipeline import run, write

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Node:
    """A cycle's member that a weak reference can watch."""

    def __init__(self) -> None:
        self.me = self


def _dropped_cycle() -> weakref.ref:
    return weakref.ref(_Node())  # the only strong reference is the cycle's own


def _watch_writing(monkeypatch, during):
    """Run ``during()`` in the save, just before it writes the weights; what it returns is kept."""
    seen = {}
    write = run.write_merged_weights

    def wrapped(*args, **kwargs):
        seen["during"] = during()
        return write(*args, **kwargs)

    monkeypatch.setattr(run, "write_merged_weights", wrapped)
    return seen


def test_older_objects_sit_out_the_save_and_come_back(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    gc.collect()
    assert gc.get_freeze_count() == 0
    old_garbage = _dropped_cycle()  # a cycle dropped before the save: only a collection frees it
    objects_before = len(gc.get_objects())

    def during():
        fresh_garbage = _dropped_cycle()
        gc.collect()  # a full collection in the save: it frees what the save dropped, not the old
        return gc.get_freeze_count(), fresh_garbage() is None, old_garbage() is None

    seen = _watch_writing(monkeypatch, during)
    fastsave.save_pretrained_merged(model, str(tmp_path / "out"), save_method="merged_16bit")
    frozen, fresh_freed, old_freed = seen["during"]
    assert frozen >= objects_before  # the model, the libraries, the old cycle: none scanned
    assert fresh_freed  # memory the save drops in cycles is still freed while it runs
    assert not old_freed  # the old cycle was not scanned
    assert gc.get_freeze_count() == 0  # everything goes back to the collector
    gc.collect()
    assert old_garbage() is None


def test_a_failed_save_gives_the_objects_back(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()

    def during():
        raise RuntimeError("stop here")

    _watch_writing(monkeypatch, during)
    with pytest.raises(RuntimeError, match="stop here"):
        fastsave.save_pretrained_merged(model, str(tmp_path / "out"), save_method="merged_16bit")
    assert gc.get_freeze_count() == 0
    assert not (tmp_path / "out").exists()


def test_a_process_that_froze_its_own_objects_keeps_them_frozen(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    own_garbage = _dropped_cycle()
    gc.freeze()  # as a forking server does: its objects stay out of collections for good
    try:
        frozen_before = gc.get_freeze_count()
        seen = _watch_writing(monkeypatch, gc.get_freeze_count)
        fastsave.save_pretrained_merged(model, str(tmp_path / "out"), save_method="merged_16bit")
        assert seen["during"] <= frozen_before  # the save froze nothing more (refcounting may free some)
        gc.collect()
        assert own_garbage() is not None  # and unfroze nothing of the process's
    finally:
        gc.unfreeze()
    gc.collect()
    assert own_garbage() is None


def test_the_exports_that_stream_a_merge_freeze_the_older_objects_too(
    qlora_model, tiny_tokenizer, tmp_path, monkeypatch
):
    """torchao's export merges through the same writer (write_merged_weights), outside run_save."""
    from torchao.quantization import Int8WeightOnlyConfig

    model = fastsave.patch(qlora_model())
    seen = []
    merge = write.write_merged_weights

    def watched(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return merge(*args, **kwargs)

    monkeypatch.setattr(write, "write_merged_weights", watched)
    model.save_pretrained_torchao(tmp_path / "ao", tiny_tokenizer, torchao_config=Int8WeightOnlyConfig())
    assert seen and seen[0] > 0
    assert gc.get_freeze_count() == 0
