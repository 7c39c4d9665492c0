"""Kill a re-save at chosen points of its file operations and look at what the directory holds.

Run by tests/test_io_kill.py as ``python kill_harness.py WORKDIR RESULT.json``. It builds a tiny
QLoRA model once, then for every case forks a child that re-saves into a copy of a directory
holding an old checkpoint (a different shard layout and dtype) and the user's own files. In the
child every file operation of the save (os.link/mkdir/rename/replace/unlink/rmdir/fsync/write/
symlink/ftruncate, renameat2, each write of shard bytes) is counted, and operation number k gets
the fault: SIGKILL, SIGINT (a real Ctrl-C), an I/O error, or ENOSPC. The points are chosen from a
dry run that lists every operation, so the timing is forced, not left to luck.

After the fault the harness records whether the directory holds exactly the old or exactly the
new checkpoint (an interrupted journaled switch is recovered first, as the next save does), what
was left behind, and then runs the next save (without faults) and records what it left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # no thread pools before fork
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)

import fastsave  # noqa: E402
from fastsave.io import filesystem, shards, switch  # noqa: E402
from fastsave.tiny import attach_lora, build_tiny_tokenizer, load_4bit, save_random_model, tiny_llama_config  # noqa: E402

OS_OPERATIONS = (
    "link",
    "mkdir",
    "rename",
    "replace",
    "unlink",
    "rmdir",
    "fsync",
    "write",
    "symlink",
    "ftruncate",
)
MODES = ("exchange", "into-mount", "into-no-exchange")
OLD = {"max_shard_size": "60KB", "dtype": torch.float16}
NEW = {"max_shard_size": "5GB", "dtype": torch.bfloat16}


def snapshot(directory: Path) -> dict[str, list]:
    """Content of ``directory`` (fastsave's own hidden entries left out: they are reported apart)."""
    entries = {}
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if not d.startswith(".fastsave")]
            files = [f for f in files if not f.startswith(".fastsave")]
        for name in dirs:
            path = Path(root) / name
            entries[str(rel_root / name)] = ["link", os.readlink(path)] if path.is_symlink() else ["dir"]
        for name in files:
            path = Path(root) / name
            if path.is_symlink():
                entries[str(rel_root / name)] = ["link", os.readlink(path)]
            else:
                entries[str(rel_root / name)] = ["file", hashlib.sha256(path.read_bytes()).hexdigest()]
    return entries


def fastsave_entries(*places: Path) -> list[str]:
    return sorted(
        f"{p.name}/{n}" for p in places if p.is_dir() for n in os.listdir(p) if n.startswith(".fastsave")
    )


def user_files(directory: Path) -> None:
    (directory / "README.md").write_text("# my model\n")
    (directory / "model-best.safetensors").write_bytes(b"best")
    (directory / "notes").mkdir()
    (directory / "notes" / "todo.txt").write_text("evaluate")
    checkpoint = directory / "checkpoint-500"
    (checkpoint / "nested").mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"step 500")
    (checkpoint / "nested" / "rng_state.pth").write_bytes(b"rng")
    os.symlink("checkpoint-500", directory / "last-checkpoint")


class Faults:
    """Counts the file operations of a save and injects one fault at operation ``at``."""

    def __init__(self, at: int = 0, kind: str = "", listing: list | None = None) -> None:
        self.at, self.kind, self.listing, self.count = at, kind, listing, 0
        self.phase = "write"

    def hit(self, label: str) -> None:
        self.count += 1
        if self.listing is not None:
            self.listing.append([label, self.phase])
        if self.count != self.at:
            return
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the KeyboardInterrupt arrives before this ends
        elif self.kind == "error":
            raise OSError(errno.EIO, f"injected I/O error at {label}")
        elif self.kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")

    def install(self) -> None:
        for name in OS_OPERATIONS:
            original = getattr(os, name)
            setattr(os, name, self._wrap(name, original))
        filesystem.renameat2 = self._wrap("renameat2", filesystem.renameat2)
        shards.ShardWriter._write_data = self._wrap("shard-write", shards.ShardWriter._write_data)
        original_publish = fastsave.io.staging.PendingSave.publish

        def publish_phase(pending):
            self.phase = "switch"
            return original_publish(pending)

        fastsave.io.staging.PendingSave.publish = publish_phase

    def _wrap(self, label, function):
        def wrapper(*args, **kwargs):
            self.hit(label)
            if label == "fsync":
                return None  # counted, not done: a killed process loses no page cache, and it is slow
            return function(*args, **kwargs)

        return wrapper


def set_mode(mode: str, directory: Path) -> None:
    if mode == "into-mount":
        real = os.path.ismount
        os.path.ismount = lambda p: Path(p) == directory or real(p)
    elif mode == "into-no-exchange":

        def no_exchange(a, b):
            raise OSError(errno.EINVAL, "Invalid argument")

        fastsave.io.staging.exchange = no_exchange
        switch.exchange = no_exchange


def in_child(function) -> dict:
    """Run ``function`` in a forked child; its JSON result, or how it died."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = function()
        except BaseException as error:
            result = {"raised": type(error).__name__, "message": str(error)[:300]}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return json.loads(data or b"{}")


def main() -> None:
    work, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    base = work / "base"
    save_random_model(tiny_llama_config(), base)
    build_tiny_tokenizer(base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = attach_lora(load_4bit(base))
    logging.getLogger("fastsave").setLevel(logging.INFO)
    template = work / "template"
    template.mkdir()
    user_files(template)
    fastsave.save_pretrained_merged(model, template, **OLD)
    old = snapshot(template)

    def fresh(name: str) -> Path:
        parent = work / name
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        shutil.copytree(template, parent / "out", symlinks=True)
        return parent / "out"

    def save(directory: Path, mode: str, faults: Faults | None = None, log: Path | None = None):
        def run():
            set_mode(mode, directory)
            if log is not None:
                handler = logging.FileHandler(log)
                logging.getLogger("fastsave").addHandler(handler)
            if faults is not None:
                faults.install()
            fastsave.save_pretrained_merged(model, directory, tokenizer, **NEW)
            return {"listing": faults.listing} if faults is not None and faults.listing is not None else {}

        return in_child(run)

    reference = fresh("reference")
    assert save(reference, "exchange") == {}
    new = snapshot(reference)

    def kill_recovery(directory: Path) -> list[str]:
        """Kill recover() at each of its file operations in turn (on copies); the state each left."""
        copy = directory.parent / "copy"

        def dry_run():
            faults = Faults(listing=[])
            faults.install()
            switch.recover(copy)
            return {"listing": faults.listing}

        shutil.copytree(directory, copy, symlinks=True)
        count = len(in_child(dry_run).get("listing", []))
        shutil.rmtree(copy)
        states = []
        for at in range(1, count + 1):
            shutil.copytree(directory, copy, symlinks=True)

            def killed(at=at):
                Faults(at, "sigkill").install()
                switch.recover(copy)
                return {}

            in_child(killed)
            switch.recover(copy)
            state = snapshot(copy)
            states.append("old" if state == old else "new" if state == new else "mixed")
            shutil.rmtree(copy)
        return states

    cases = []
    planned: dict[str, dict[str, list[int]]] = {}
    recovery_killed: set = set()
    for mode in MODES:
        listing = save(fresh("dry"), mode, Faults(listing=[]))["listing"]
        switching = [i + 1 for i, (_, phase) in enumerate(listing) if phase == "switch"]
        writing = [i + 1 for i, (_, phase) in enumerate(listing) if phase == "write"]
        renames = [i for i in switching if listing[i - 1][0] in ("rename", "replace", "renameat2")]

        def spread(points: list[int], n: int) -> list[int]:
            return (
                sorted({points[round(j * (len(points) - 1) / max(n - 1, 1))] for j in range(n)})
                if points
                else []
            )

        after_renames = [i + 1 for i in renames if i + 1 in switching]
        shard_writes = [i for i in writing if listing[i - 1][0] == "shard-write"]
        others = set(spread(switching, 3)) | set(spread(writing, 2)) | set(spread(shard_writes, 3)[1:2])
        plan = {
            # every rename of the switch (and the operation after it) in two modes; the third
            # mode shares the journal code with the second: a sample there
            "sigkill": sorted(
                set(renames if mode != "into-no-exchange" else spread(renames, 5))
                | set(after_renames if mode != "into-no-exchange" else after_renames[-1:])
                | set(spread(switching, 4))
                | set(spread(writing, 3))
            ),
            "sigint": sorted(others),
            "error": sorted(others),
            "enospc": sorted(others),
        }
        planned[mode] = plan
        for kind, points in plan.items():
            for at in points:
                directory = fresh("case")
                parent = directory.parent
                outcome = save(directory, mode, Faults(at, kind))
                case = {
                    "mode": mode,
                    "kind": kind,
                    "at": at,
                    "op": listing[at - 1][0],
                    "phase": listing[at - 1][1],
                }
                case["outcome"] = outcome
                case["left_after_fault"] = fastsave_entries(parent, directory)
                journal = switch.read_journal(directory)
                if journal is not None:
                    key = (mode, journal.get("phase"))
                    if key not in recovery_killed:  # the recovery itself killed at each of its operations
                        recovery_killed.add(key)
                        case["recovery_killed"] = [journal.get("phase"), *kill_recovery(directory)]
                    case["recovered"] = switch.recover(directory)
                state = snapshot(directory)
                case["state"] = "old" if state == old else "new" if state == new else "mixed"
                if case["state"] == "mixed":
                    keys = sorted(set(state) | set(old) | set(new))
                    case["vs_old"] = [k for k in keys if state.get(k) != old.get(k)][:8]
                    case["vs_new"] = [k for k in keys if state.get(k) != new.get(k)][:8]
                log = parent / "next.log"
                case["next"] = save(directory, mode, Faults(), log=log)  # (Faults(): no fault, no fsync)
                case["next_state"] = "new" if snapshot(directory) == new else "other"
                case["left_after_next"] = fastsave_entries(parent, directory)
                case["next_log"] = log.read_text() if log.exists() else ""
                cases.append(case)
    result_path.write_text(json.dumps({"cases": cases, "planned": planned}, indent=1))


if __name__ == "__main__":
    main()
