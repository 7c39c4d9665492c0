"""What a save does to save_directory: replaces exactly its own checkpoint, keeps every other file
byte for byte (same inodes), never mixes an adapter with a merged model, checks the target before
merging and creates nothing on failure, one save at a time, cleans up after dead saves."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from checkpoint_files import leftovers, snapshot
from patch_sites import replace_at
from safetensors import safe_open

import fastsave
from fastsave.errors import SaveInProgressError, TargetError
from fastsave.io import lock as lock_module
from fastsave.io.lock import DirectoryLock, OwnerRecord
from fastsave.io.ownership import MODEL_CARD_MARKER
from fastsave.io.target import inspect_target

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tensor_names(directory: Path) -> set[str]:
    names = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            names.update(handle.keys())
    return names


def user_files(directory: Path) -> None:
    """What people keep beside a checkpoint, including names that look like weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README.md").write_text("# my model\nmy own notes\n")
    (directory / "model-best.safetensors").write_bytes(b"best weights")
    (directory / "model_backup.safetensors").write_bytes(b"backup")
    (directory / "pytorch_model_epoch3.bin").write_bytes(b"epoch 3")
    (directory / "training_args.json").write_text("{}")
    checkpoint = directory / "checkpoint-500"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text("{}")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"adapter of step 500")
    (checkpoint / "optimizer.pt").write_bytes(os.urandom(4096))
    (checkpoint / "nested").mkdir()
    (checkpoint / "nested" / "rng_state.pth").write_bytes(b"rng")
    os.symlink("checkpoint-500", directory / "last-checkpoint")


USER = {
    "README.md",
    "model-best.safetensors",
    "model_backup.safetensors",
    "pytorch_model_epoch3.bin",
    "training_args.json",
    "checkpoint-500",
    "last-checkpoint",
}


def only_user(entries: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in entries.items() if k.split("/")[0] in USER}


# --------------------------------------------------------------------------- ownership


def test_resave_replaces_exactly_its_checkpoint_and_keeps_the_rest(qlora_model, tiny_tokenizer, tmp_path):
    model = qlora_model()
    out = tmp_path / "out"
    user_files(out)
    fastsave.save_pretrained_merged(model, out, tiny_tokenizer, max_shard_size="60KB")
    mine = only_user(snapshot(out))
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    (out / "pytorch_model.bin").write_bytes(b"a stale .bin twin")
    # smaller again: the stale shards of the bigger save, the index and the .bin twin go
    fastsave.save_pretrained_merged(model, out, tiny_tokenizer)
    after = snapshot(out)
    assert only_user(after) == mine  # byte for byte, same inodes, symlink still a symlink
    assert not list(out.glob("model-0*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert not (out / "pytorch_model.bin").exists()
    assert set(os.listdir(out)) == USER | {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert leftovers(tmp_path, out) == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_weights_named_by_an_index_belong_to_the_checkpoint(qlora_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights-a.safetensors").write_bytes(b"old shard with a custom name")
    (out / "notes.safetensors").write_bytes(b"not named by the index")
    index = {"metadata": {}, "weight_map": {"x": "weights-a.safetensors", "y": "../escape.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "escape.safetensors").write_bytes(b"outside the directory")
    fastsave.save_pretrained_merged(qlora_model(), out)
    assert not (out / "weights-a.safetensors").exists()
    assert (out / "notes.safetensors").is_file() and (tmp_path / "escape.safetensors").is_file()


def test_stale_tokenizer_files_of_a_previous_fastsave_save(
    qlora_model, tiny_tokenizer, tmp_path, tiny_base_dir
):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, tiny_tokenizer)
    (out / "vocab.json").write_text("{}")  # as if the previous tokenizer had one
    fastsave.save_pretrained_merged(model, out)  # no tokenizer given: the old files stay
    assert {"tokenizer.json", "vocab.json"} <= set(os.listdir(out))
    fastsave.save_pretrained_merged(model, out, tiny_tokenizer)  # a tokenizer: the old one's extra file goes
    assert not (out / "vocab.json").exists() and (out / "tokenizer.json").is_file()
    # next to a checkpoint fastsave did not write, a tokenizer file it does not write now is the user's
    other = tmp_path / "other"
    model.get_base_model().save_pretrained(other)
    (other / "vocab.json").write_text("{}")
    fastsave.save_pretrained_merged(model, other, tiny_tokenizer)
    assert (other / "vocab.json").is_file()


def test_a_readme_is_replaced_only_when_fastsave_wrote_it(qlora_model, tmp_path):
    model = qlora_model()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own card\n")
    fastsave.save_pretrained_merged(model, mine, save_method="lora")  # peft writes a README.md card
    assert (mine / "README.md").read_text() == "my own card\n"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "README.md").write_text(f"---\nlicense: mit\n---\n{MODEL_CARD_MARKER}\nan old card\n")
    fastsave.save_pretrained_merged(model, ours, save_method="lora")
    assert "an old card" not in (ours / "README.md").read_text()  # replaced by the new save's card
    fastsave.save_pretrained_merged(model, tmp_path / "fresh", save_method="lora")
    assert (tmp_path / "fresh" / "README.md").is_file()  # what peft writes, when nothing is in the way


def test_a_new_adapter_folder_never_replaces_a_user_folder(qlora_model, tmp_path):
    from peft import LoraConfig

    model = qlora_model()
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    out = tmp_path / "out"
    (out / "other").mkdir(parents=True)
    (out / "other" / "data.csv").write_text("a,b\n")
    before = snapshot(out)
    with pytest.raises(TargetError, match="other"):
        fastsave.save_pretrained_merged(model, out, save_method="lora")
    assert snapshot(out) == before and leftovers(tmp_path, out) == []
    (out / "other" / "data.csv").unlink()
    fastsave.save_pretrained_merged(model, out, save_method="lora")
    fastsave.save_pretrained_merged(model, out, save_method="lora")  # its own adapter folder: replaced
    assert sorted(os.listdir(out / "other")) == ["adapter_config.json", "adapter_model.safetensors"]


# --------------------------------------------------------------------------- kinds never mix


def _no_merge(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the merge started")

    monkeypatch.setattr("fastsave.pipeline.run.output_plan", refuse)
    monkeypatch.setattr("fastsave.pipeline.write.ShardWriter", refuse)


def test_the_refused_patch_points_are_on_the_save_path(qlora_model, tmp_path, monkeypatch):
    """_no_merge (here and in test_core_disk_space) proves "refused before merging" only if a save
    really plans and writes through these two names."""
    from fastsave.pipeline import run, write

    planned = replace_at(monkeypatch, "fastsave.pipeline.run.output_plan", run.output_plan)
    writers = replace_at(monkeypatch, "fastsave.pipeline.write.ShardWriter", write.ShardWriter)
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out")
    assert planned and writers


def test_merged_save_into_an_adapter_directory_is_refused_before_merging(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    out = tmp_path / "outputs"
    model.save_pretrained(out)  # the user's adapter
    before = snapshot(out)
    _no_merge(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"(?s)holds a LoRA adapter \(adapter_config.json, adapter_model.safetensors\).*outputs-merged",
    ):
        fastsave.save_pretrained_merged(model, out)
    assert snapshot(out) == before and leftovers(tmp_path, out) == []


def test_lora_save_into_a_merged_directory_is_refused(qlora_model, tmp_path):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"(?s)merged model's weights \(model.safetensors\).*out-lora"):
        fastsave.save_pretrained_merged(model, out, save_method="lora")
    assert snapshot(out) == before


def test_cli_merge_into_its_own_adapter_directory_exits_nonzero(qlora_model, tiny_base_dir, tmp_path, capsys):
    from fastsave.cli import main

    adapter = tmp_path / "adapter"
    qlora_model().save_pretrained(adapter)
    before = snapshot(adapter)
    assert main(["merge", str(adapter), str(adapter), "--base", str(tiny_base_dir)]) == 1
    assert "holds a LoRA adapter" in capsys.readouterr().err
    assert snapshot(adapter) == before and leftovers(tmp_path, adapter) == []


# --------------------------------------------------------------------------- checked before merging


def test_a_tokenizer_that_is_not_one_is_refused_before_anything(qlora_model, tmp_path, monkeypatch):
    _no_merge(monkeypatch)
    with pytest.raises(TypeError, match="tokenizer must be"):
        fastsave.save_pretrained_merged(qlora_model(), tmp_path / "a" / "out", "gpt2")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_creates_nothing(qlora_model, tmp_path):
    scratch = tmp_path / "scratch"
    with pytest.raises(ValueError):
        fastsave.save_pretrained_merged(
            qlora_model(), tmp_path / "a" / "b" / "out", adapter_names=["nope"], temporary_location=scratch
        )
    assert list(tmp_path.iterdir()) == []  # no parents, no temporary_location, no empty save_directory


def test_long_names_and_paths_that_cannot_be_created(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    longest = tmp_path / ("d" * 255)
    fastsave.save_pretrained_merged(model, longest)  # the staging name is short: this fits
    fastsave.save_pretrained_merged(model, longest)
    assert (longest / "model.safetensors").is_file() and leftovers(tmp_path, longest) == []
    _no_merge(monkeypatch)
    with pytest.raises(TargetError, match="256 bytes long"):
        fastsave.save_pretrained_merged(model, tmp_path / ("d" * 256))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        fastsave.save_pretrained_merged(model, tmp_path / "file")
    with pytest.raises(TargetError, match="cannot be created"):
        fastsave.save_pretrained_merged(model, tmp_path / "file" / "out")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with pytest.raises(TargetError, match="does not exist"):
        fastsave.save_pretrained_merged(model, tmp_path / "dangling")
    monkeypatch.setattr("fastsave.io.target._writable", lambda path: False)
    with pytest.raises(TargetError, match="not writable"):
        fastsave.save_pretrained_merged(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([longest.name, "file", "dangling"])


def test_a_symlinked_target_is_written_into_and_stays_a_symlink(qlora_model, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    os.symlink(real, tmp_path / "link")
    model = qlora_model()
    fastsave.save_pretrained_merged(model, tmp_path / "link")
    fastsave.save_pretrained_merged(model, tmp_path / "link", max_shard_size="60KB")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    assert (real / "model.safetensors.index.json").is_file() and (real / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path, real) == []


def test_a_mount_point_or_the_working_directory_is_written_into(
    qlora_model, tmp_path, monkeypatch, fastsave_log
):
    """A mount point cannot be replaced (EBUSY) and replacing the working directory would leave the
    process in a deleted one: both keep their inode; the files are switched in under a journal."""
    model = qlora_model()
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "notes.txt").write_text("mine")
    inode = mount.stat().st_ino
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real_ismount(p))
    assert inspect_target(mount).mode == "into" and inspect_target(mount).home == mount
    with fastsave_log.at_level("INFO", logger="fastsave"):
        fastsave.save_pretrained_merged(model, mount)
        fastsave.save_pretrained_merged(model, mount, max_shard_size="60KB")
    assert "it is a mount point" in fastsave_log.text
    assert mount.stat().st_ino == inode and (mount / "notes.txt").read_text() == "mine"
    assert leftovers(mount, tmp_path) == []
    assert fastsave.io.verify.verify_checkpoint(mount, checksums=True).ok
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    inode = work.stat().st_ino
    fastsave.save_pretrained_merged(model, ".")
    fastsave.save_pretrained_merged(model, ".", max_shard_size="60KB")
    assert Path.cwd().stat().st_ino == inode and (work / "model.safetensors.index.json").is_file()
    assert leftovers(work, tmp_path) == []


def test_without_rename_exchange_the_journaled_sequence_is_used(
    qlora_model, tmp_path, monkeypatch, fastsave_log
):
    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")

    probed = replace_at(monkeypatch, "fastsave.io.staging.exchange", no_exchange)
    switched = replace_at(monkeypatch, "fastsave.io.switch.exchange", no_exchange)
    model = qlora_model()
    out = tmp_path / "out"
    user_files(out)
    mine = only_user(snapshot(out))
    with fastsave_log.at_level("INFO", logger="fastsave"):
        fastsave.save_pretrained_merged(model, out, max_shard_size="60KB")
        fastsave.save_pretrained_merged(model, out)
    assert "no atomic directory exchange" in fastsave_log.text
    assert probed or switched, "the exchange was never attempted where it was replaced"
    assert only_user(snapshot(out)) == mine and (out / "model.safetensors").is_file()
    assert not list(out.glob("model-0*")) and leftovers(tmp_path, out) == []


# --------------------------------------------------------------------------- one save at a time


def test_a_second_save_into_the_same_directory_fails_at_once(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    before = snapshot(out)
    lock = DirectoryLock(inspect_target(out).lock_path)
    lock.acquire(OwnerRecord(target=str(out), pid=4242, host="trainer-7"))
    try:
        _no_merge(monkeypatch)
        # "at once": every attempt on the lock is non-blocking; the save never waits for the holder
        flags = []
        real_flock = lock_module.fcntl.flock
        monkeypatch.setattr(lock_module.fcntl, "flock", lambda fd, op: flags.append(op) or real_flock(fd, op))
        with pytest.raises(
            SaveInProgressError, match=r"another save into .* is running \(pid 4242 on host trainer-7"
        ):
            fastsave.save_pretrained_merged(model, out)
        assert flags and all(op & fcntl.LOCK_NB for op in flags if op & fcntl.LOCK_EX), flags
    finally:
        lock.release()
    assert snapshot(out) == before and leftovers(tmp_path) == []


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    record = {"target": sys.argv[2], "pid": os.getpid(), "host": "h", "started": "s", "staging": [sys.argv[3]]}
    os.write(fd, json.dumps(record).encode())
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_another_process_holding_the_lock_and_dead_saves_cleaned_up(qlora_model, tmp_path, fastsave_log):
    """A live save's lock and staging are left alone; once its process is gone (SIGKILL) the next
    save removes its staging directory and says whose it was."""
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    target = inspect_target(out)
    staging = target.home / target.staging_name("dead")
    staging.mkdir()
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(target.lock_path), str(target.path), str(staging)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SaveInProgressError, match=f"pid {holder.pid}"):
            fastsave.save_pretrained_merged(model, out)
        assert staging.is_dir()  # a live save's staging is not touched
    finally:
        holder.kill()
        holder.wait()
    # another target's save in the same parent leaves this target's lock alone while it is held...
    legacy = tmp_path / ".fastsave-staging-out-1a2b3c4d"  # left by an older fastsave version
    legacy.mkdir()
    recent = tmp_path / ".fastsave-staging-other-5e6f7a8b"
    recent.mkdir()
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    with fastsave_log.at_level("INFO", logger="fastsave"):
        fastsave.save_pretrained_merged(model, out)
    assert not staging.exists() and not legacy.exists()
    assert recent.is_dir()  # too fresh to be known dead: may belong to a running save of an old version
    assert f"removed {staging}" in fastsave_log.text and f"pid {holder.pid} on host h" in fastsave_log.text
    assert not target.lock_path.exists()
    recent.rmdir()
    assert leftovers(tmp_path, out) == []


# --------------------------------------------------------------------------- changes during a save


def test_files_changed_in_the_directory_during_the_save_are_kept(qlora_model, tmp_path, monkeypatch):
    """Between hard-linking the user's files into staging and the exchange, a training job writes a
    new file and replaces another: both survive the switch."""
    from fastsave.io import switch

    model = qlora_model()
    out = tmp_path / "out"
    user_files(out)
    real = switch.exchange_directories

    def meanwhile(staging, directory):
        (directory / "events.out.tfevents").write_text("new log")
        (directory / "training_args.json.tmp").write_text('{"lr": 1}')
        os.replace(directory / "training_args.json.tmp", directory / "training_args.json")
        (directory / "checkpoint-500" / "trainer_state.json").write_text("{}")
        return real(staging, directory)

    monkeypatch.setattr(switch, "exchange_directories", meanwhile)
    fastsave.save_pretrained_merged(model, out)
    assert (out / "events.out.tfevents").read_text() == "new log"
    assert (out / "training_args.json").read_text() == '{"lr": 1}'
    assert (out / "checkpoint-500" / "trainer_state.json").is_file()
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path, out) == []


def test_nan_anywhere_is_refused_naming_the_tensor(qlora_model, tmp_path):
    from fastsave.errors import NonFiniteError, PlanError

    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out)
    before = snapshot(out)
    norm = model.get_base_model().model.norm.weight
    with torch.no_grad():
        norm[3] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"'model\.norm\.weight' \(bfloat16, 64 values\) holds 1 NaN and 0 Inf"
    ):
        fastsave.save_pretrained_merged(model, out)
    with torch.no_grad():
        norm[3] = 1e6  # fine in bfloat16, Inf in float16
    # (the float32 check in fastsave.rounding may say so first, before this tensor reaches the writer)
    with pytest.raises(PlanError, match=r"(?s)'model\.norm\.weight'.*overflow.*dtype=torch.bfloat16"):
        fastsave.save_pretrained_merged(model, out, dtype=torch.float16)
    assert snapshot(out) == before and leftovers(tmp_path, out) == []


def test_a_variant_replaces_only_its_own_weights(qlora_model, tmp_path):
    """transformers keeps variants side by side (model.fp16.safetensors beside model.safetensors)."""
    from fastsave.io.verify import verify_checkpoint

    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, variant="fp16", dtype=torch.float16, max_shard_size="60KB")
    fp16 = {k: v for k, v in snapshot(out).items() if ".fp16" in k}
    assert len(fp16) > 3
    fastsave.save_pretrained_merged(model, out)  # the plain names: the fp16 variant stays
    assert {k: v for k, v in snapshot(out).items() if ".fp16" in k} == fp16
    plain = snapshot(out)["model.safetensors"]
    fastsave.save_pretrained_merged(model, out, variant="fp16", dtype=torch.float16)  # one file now
    names = set(os.listdir(out))
    assert "model.fp16.safetensors" in names and not any(n.startswith("model.fp16-") for n in names)
    assert "model.safetensors.index.fp16.json" not in names and snapshot(out)["model.safetensors"] == plain
    assert verify_checkpoint(out, checksums=True).ok


def test_a_gguf_export_owns_only_the_files_it_writes(tmp_path):
    from fastsave.io.ownership import GGUF, check_kinds_do_not_mix, plan_replacement

    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    staging.mkdir()
    for name in ("model.safetensors", "config.json", "model.Q8_0.gguf", "other.gguf"):
        (out / name).write_text("x")
    (out / "README.md").write_text(f"---\n---\n{MODEL_CARD_MARKER}\nold card\n")
    (staging / "model.Q8_0.gguf").write_text("new")
    (staging / "README.md").write_text("new card")
    check_kinds_do_not_mix(out, GGUF)  # beside a merged checkpoint: allowed
    assert plan_replacement(out, GGUF, staging).remove == ["README.md", "model.Q8_0.gguf"]
