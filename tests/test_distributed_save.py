"""Collective saves on 2 CPU ranks (gloo): a sharded model saved by every rank, and ``fastsave merge``
split across ranks.

The oracle for every sharded save is the single-process save of the same model unsharded: the
same seed builds it in the test process (or, after training under FSDP2, torch's own full state
dict of the trained model is loaded into an unsharded copy), and the two directories must hold
the same files, byte for byte (the single-process save is itself held to peft's merge and a
float32 reference elsewhere). Both are saved into directories named ``out`` (the model card
names its directory).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_files import leftovers
from distributed_harness import qlora_for_sharding, run_ranks, tiny_peft, values, zero3_engine

import fastsave
from fastsave.parallel.ranks import RankFailedError
from fastsave.plan.items import Plan, PlanItem, SharedProducer
from fastsave.tiny import attach_lora, load_4bit, tiny_llama_config

SHARD = "60KB"  # the tiny model (about 230 KB) in 4-5 shards: both ranks write some


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _assert_same(solo: Path, collective: Path) -> None:
    a, b = _files(solo), _files(collective)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


def _assert_split(written: list[list[str]], collective: Path) -> None:
    """Each of the two ranks wrote shards of its own, and together exactly the checkpoint's shards."""
    mine, theirs = (set(w) for w in written)
    assert mine and theirs and not mine & theirs, written
    assert mine | theirs == {p.name for p in collective.glob("*.safetensors")}


def _fully_shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _count_gathers(state: dict) -> None:
    """Count in ``state`` how many gathers are open at once, at most (one walk unit's: 1)."""
    from contextlib import contextmanager

    from fastsave.sources import sharded

    real = sharded.ShardedModel.gathered

    @contextmanager
    def counting(self, entries):
        state["open"] += 1
        state["most"] = max(state["most"], state["open"])
        try:
            with real(self, entries) as tensors:
                yield tensors
        finally:
            state["open"] -= 1

    sharded.ShardedModel.gathered = counting


def _record_written_shards() -> list[str]:
    """The names of the shard files this rank's writer writes (filled in as the save runs)."""
    from fastsave.io import shards

    written: list[str] = []
    real = shards.ShardWriter.__init__

    def recording(self, directory, planned, *args, **kwargs):
        written.extend(shard.filename for shard in planned)
        real(self, directory, planned, *args, **kwargs)

    shards.ShardWriter.__init__ = recording
    return written


# -- FSDP2, trained ---------------------------------------------------------------------------


def _fsdp2_worker(rank: int, world: int, out: str) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = tiny_peft()
    _fully_shard(model)
    # one real training step under FSDP2 (the model is then as a training job leaves it)
    batch = torch.arange(16).reshape(2, 8) + 4 * rank
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    # torch's own full state dict of the trained model, for the oracle (rank 0 saves it unsharded)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, f"{out}/full_state_dict.pt")
    del full
    gathers = {"open": 0, "most": 0}
    _count_gathers(gathers)
    written = _record_written_shards()
    # is_main_process=False on rank 1: a sharded model's every rank still takes part
    path = fastsave.save_pretrained_merged(
        model, f"{out}/collective/out", max_shard_size=SHARD, is_main_process=rank == 0
    )
    return {"path": path, "most_open": gathers["most"], "written": written}


def test_fsdp2_trained_model_saved_by_two_ranks_is_the_single_process_save(tmp_path):
    reports = values(run_ranks(_fsdp2_worker, str(tmp_path)))
    assert all(r["path"] == str(tmp_path / "collective" / "out") for r in reports)
    assert all(r["most_open"] == 1 for r in reports)  # one module's gather at a time
    _assert_split([r["written"] for r in reports], tmp_path / "collective" / "out")
    reference = tiny_peft()
    reference.load_state_dict(torch.load(tmp_path / "full_state_dict.pt"))
    fastsave.save_pretrained_merged(reference, tmp_path / "solo" / "out", max_shard_size=SHARD)
    _assert_same(tmp_path / "solo" / "out", tmp_path / "collective" / "out")
    assert leftovers(tmp_path) == []


# -- FSDP2, a compressed-tensors save ----------------------------------------------------------


def _fsdp2_compressed_worker(rank: int, world: int, out: str) -> dict:
    from fastsave.errors import PlanError

    model = tiny_peft()
    _fully_shard(model)
    written = _record_written_shards()
    fastsave.save_pretrained_merged(model, f"{out}/collective/out", save_method="fp8", max_shard_size=SHARD)
    try:  # NVFP4 needs each weight's largest magnitude before quantizing it: refused across ranks
        fastsave.save_pretrained_merged(model, f"{out}/nvfp4/out", save_method="nvfp4a16")
        refused = ""
    except PlanError as error:
        refused = str(error)
    return {"written": written, "refused": refused}


def test_fsdp2_fp8_save_by_two_ranks_is_the_single_process_save(tmp_path):
    reports = values(run_ranks(_fsdp2_compressed_worker, str(tmp_path)))
    _assert_split([r["written"] for r in reports], tmp_path / "collective" / "out")
    fastsave.save_pretrained_merged(
        tiny_peft(), tmp_path / "solo" / "out", save_method="fp8", max_shard_size=SHARD
    )
    _assert_same(tmp_path / "solo" / "out", tmp_path / "collective" / "out")
    assert all("across ranks" in r["refused"] for r in reports)
    assert not (tmp_path / "nvfp4").exists() or leftovers(tmp_path / "nvfp4") == []


# -- FSDP1, tied embeddings -------------------------------------------------------------------


def _fsdp1_worker(rank: int, world: int, out: str) -> dict[bool, list[str]]:
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    written = _record_written_shards()
    per_save = {}
    for use_orig_params in (False, True):
        model = tiny_peft(tie=True)
        wrapped = FSDP(
            model,
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
            use_orig_params=use_orig_params,
            device_id=torch.device("cpu"),  # FSDP1 refuses the CPU unless told
        )
        with torch.no_grad():
            wrapped(input_ids=torch.arange(8)[None])
        fastsave.save_pretrained_merged(wrapped, f"{out}/orig-{use_orig_params}/out", max_shard_size=SHARD)
        per_save[use_orig_params] = list(written)
        written.clear()
    return per_save


def test_fsdp1_tied_model_saved_by_two_ranks_is_the_single_process_save(tmp_path):
    reports = values(run_ranks(_fsdp1_worker, str(tmp_path)))
    fastsave.save_pretrained_merged(tiny_peft(tie=True), tmp_path / "solo" / "out", max_shard_size=SHARD)
    assert "lm_head.weight" not in (tmp_path / "solo" / "out" / "model.safetensors.index.json").read_text()
    for use_orig_params in (False, True):
        _assert_same(tmp_path / "solo" / "out", tmp_path / f"orig-{use_orig_params}" / "out")
        _assert_split([r[use_orig_params] for r in reports], tmp_path / f"orig-{use_orig_params}" / "out")


# -- bitsandbytes 4-bit under FSDP2, 16-bit and forced 4-bit ------------------------------------


def _bnb_worker(rank: int, world: int, base_dir: str, out: str) -> list[list[str]]:
    model = qlora_for_sharding(base_dir)
    _fully_shard(model)
    written = _record_written_shards()
    fastsave.save_pretrained_merged(model, f"{out}/collective/out", max_shard_size=SHARD)
    sixteen_bit = list(written)
    written.clear()
    # re-quantized: several parts made together per weight, split across shards and ranks
    fastsave.save_pretrained_merged(
        model, f"{out}/collective-4bit/out", save_method="merged_4bit_forced", max_shard_size="20KB"
    )
    return [sixteen_bit, list(written)]


def test_bnb_4bit_under_fsdp2_saved_by_two_ranks_is_the_single_process_save(tiny_base_dir, tmp_path):
    reports = values(run_ranks(_bnb_worker, str(tiny_base_dir), str(tmp_path)))
    _assert_split([r[0] for r in reports], tmp_path / "collective" / "out")
    _assert_split([r[1] for r in reports], tmp_path / "collective-4bit" / "out")
    model = qlora_for_sharding(tiny_base_dir)
    fastsave.save_pretrained_merged(model, tmp_path / "solo" / "out", max_shard_size=SHARD)
    _assert_same(tmp_path / "solo" / "out", tmp_path / "collective" / "out")
    with pytest.warns(UserWarning, match="re-quantiz"):
        fastsave.save_pretrained_merged(
            model, tmp_path / "solo-4bit" / "out", save_method="merged_4bit_forced", max_shard_size="20KB"
        )
    _assert_same(tmp_path / "solo-4bit" / "out", tmp_path / "collective-4bit" / "out")


# -- DeepSpeed ZeRO-3 -------------------------------------------------------------------------


def _zero3_worker(rank: int, world: int, base_dir: str, out: str) -> dict[str, list[str]]:
    written = _record_written_shards()
    per_save = {}
    for name, make in (("bf16", tiny_peft), ("4bit", lambda: qlora_for_sharding(base_dir))):
        engine = zero3_engine(make())
        assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned
        fastsave.save_pretrained_merged(engine, f"{out}/{name}/out", max_shard_size=SHARD)
        per_save[name] = list(written)
        written.clear()
    return per_save


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero3_model_saved_by_two_ranks_is_the_single_process_save(tiny_base_dir, tmp_path):
    reports = values(run_ranks(_zero3_worker, str(tiny_base_dir), str(tmp_path), join_timeout_s=300))
    for name in ("bf16", "4bit"):
        _assert_split([r[name] for r in reports], tmp_path / name / "out")
    fastsave.save_pretrained_merged(tiny_peft(), tmp_path / "solo-bf16" / "out", max_shard_size=SHARD)
    fastsave.save_pretrained_merged(
        qlora_for_sharding(tiny_base_dir), tmp_path / "solo-4bit" / "out", max_shard_size=SHARD
    )
    _assert_same(tmp_path / "solo-bf16" / "out", tmp_path / "bf16" / "out")
    _assert_same(tmp_path / "solo-4bit" / "out", tmp_path / "4bit" / "out")


# -- failures ---------------------------------------------------------------------------------


def _failing_worker(rank: int, world: int, out: str) -> None:
    from fastsave.io import shards

    if rank == 1:

        def broken(self, data, release=None):
            raise OSError(5, "injected write error on rank 1")

        shards.ShardWriter._write_data = broken
    model = tiny_peft()
    _fully_shard(model)
    fastsave.save_pretrained_merged(model, f"{out}/out", max_shard_size=SHARD)


def test_a_failing_rank_makes_every_rank_fail_with_its_error_and_nothing_is_published(tmp_path):
    fastsave.save_pretrained_merged(tiny_peft(tie=True), tmp_path / "out", max_shard_size=SHARD)
    before = _files(tmp_path / "out")
    outcomes = run_ranks(_failing_worker, str(tmp_path))
    assert [o.ok for o in outcomes] == [False, False]
    # rank 1 raises its own error; rank 0 an error naming rank 1 and what went wrong there
    assert outcomes[1].error[0] == "OSError" and "injected write error on rank 1" in outcomes[1].error[1]
    assert outcomes[0].error[0] == RankFailedError.__name__
    assert "rank 1: OSError: [Errno 5] injected write error on rank 1" in outcomes[0].error[1]
    assert "nothing was published" in outcomes[0].error[1]
    assert _files(tmp_path / "out") == before  # the previous checkpoint, untouched
    assert leftovers(tmp_path) == []


def _killed_worker(rank: int, world: int, out: str, victim: int) -> None:
    from fastsave.io import shards

    if rank == victim:
        real = shards.ShardWriter._write_data

        def dying(self, data, release=None):
            real(self, data, release)  # the header of this rank's first shard is on disk, then the rank dies
            os.kill(os.getpid(), signal.SIGKILL)

        shards.ShardWriter._write_data = dying
    model = tiny_peft()
    _fully_shard(model)
    fastsave.save_pretrained_merged(model, f"{out}/out", max_shard_size=SHARD)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_write_publishes_nothing_and_the_next_save_leaves_no_staging(tmp_path, victim):
    fastsave.save_pretrained_merged(tiny_peft(tie=True), tmp_path / "out", max_shard_size=SHARD)
    before = _files(tmp_path / "out")
    # the group's timeout is longer than the harness waits: a survivor that reports an error (not
    # "hung") noticed the dead peer itself, not through that timeout
    outcomes = run_ranks(_killed_worker, str(tmp_path), victim, pg_timeout_s=600, join_timeout_s=120)
    survivor = outcomes[1 - victim]
    assert outcomes[victim].error[0] == "died"
    assert survivor.error is not None and survivor.error[0] in ("RankLostError", "RankFailedError")
    assert _files(tmp_path / "out") == before
    if victim == 1:
        assert leftovers(tmp_path) == []  # rank 0 lived and removed its staging directory
    else:
        assert leftovers(tmp_path)  # rank 0 died holding it: the next save removes it
    fastsave.save_pretrained_merged(tiny_peft(), tmp_path / "out", max_shard_size=SHARD)
    assert leftovers(tmp_path) == []
    assert _files(tmp_path / "out") != before


def _alone_worker(rank: int, world: int, out: str) -> str:
    os.environ["FASTSAVE_ROLL_CALL_SECONDS"] = "2"
    model = tiny_peft()
    _fully_shard(model)
    if rank == 1:
        return "did not call the save"  # as under `if accelerator.is_main_process:` on rank 0
    fastsave.save_pretrained_merged(model, f"{out}/out")
    return "saved"


def test_a_save_called_on_rank_0_only_is_refused_instead_of_hanging(tmp_path):
    outcomes = run_ranks(_alone_worker, str(tmp_path), pg_timeout_s=60)
    assert outcomes[1].value == "did not call the save"
    assert outcomes[0].error[0] == "CollectiveCallError"
    assert "only rank(s) [0] had called it, not [1]" in outcomes[0].error[1]
    assert outcomes[0].seconds < 30
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _disagreeing_worker(rank: int, world: int, out: str) -> None:
    model = tiny_peft()
    _fully_shard(model)
    dtype = torch.bfloat16 if rank == 0 else torch.float16  # not the same save on both ranks
    fastsave.save_pretrained_merged(model, f"{out}/out", dtype=dtype)


def test_ranks_that_plan_different_saves_are_refused(tmp_path):
    outcomes = run_ranks(_disagreeing_worker, str(tmp_path))
    for outcome in outcomes:
        assert outcome.error[0] == "RanksDisagreeError"
        assert "the plan of the save differs between ranks" in outcome.error[1]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- the command line on 2 ranks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from fastsave.tiny import build_tiny_tokenizer, save_random_model

    root = tmp_path_factory.mktemp("cli")
    base = save_random_model(tiny_llama_config(), root / "base", seed=1)
    build_tiny_tokenizer(base)
    attach_lora(load_4bit(base), seed=3).save_pretrained(str(root / "adapter"))
    return root


def _cli_worker(rank: int, world: int, root: str, out: str) -> tuple[int, list[str]]:
    from fastsave.cli import main

    written = _record_written_shards()
    status = main(["merge", f"{root}/adapter", out, "--base", f"{root}/base", "--max-shard-size", SHARD])
    return status, written


def test_merge_on_two_ranks_is_the_single_process_merge(saved_adapter, tmp_path):
    from fastsave.cli import main

    root = saved_adapter
    reports = values(run_ranks(_cli_worker, str(root), str(tmp_path / "two" / "out")))
    assert [status for status, _ in reports] == [0, 0]
    _assert_split([written for _, written in reports], tmp_path / "two" / "out")
    argv = ["merge", f"{root}/adapter", str(tmp_path / "one" / "out"), "--base", f"{root}/base"]
    assert main([*argv, "--max-shard-size", SHARD]) == 0
    _assert_same(tmp_path / "one" / "out", tmp_path / "two" / "out")


def _torchrun_merge(entry: list[str], root: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``fastsave merge`` of the saved adapter into ``out`` on two ranks started by torchrun, run
    as ``entry`` (``["-m", "fastsave"]``, or a script that runs the same main); the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *entry]
    args = ["merge", f"{root}/adapter", str(out), "--base", f"{root}/base", "--max-shard-size", SHARD]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*command, *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_torchrun_runs_the_merge_command_on_two_ranks(saved_adapter, tmp_path):
    root = saved_adapter
    done = _torchrun_merge(["-m", "fastsave"], root, tmp_path / "two" / "out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "by 2 ranks" in done.stderr  # rank 0's summary
    from fastsave.api import merge_adapter

    merge_adapter(root / "adapter", tmp_path / "one" / "out", base=root / "base", max_shard_size=SHARD)
    _assert_same(tmp_path / "one" / "out", tmp_path / "two" / "out")


def test_the_merge_command_on_ranks_leaves_no_process_group_behind(saved_adapter, tmp_path):
    """Under torchrun the command makes its process group and destroys it: no gloo thread of it is
    left for the interpreter's exit to tear down (which aborted a rank about once in 50 runs).
    torch._dynamo, imported after the group was made, kept it alive (fastsave.cli.merge)."""
    probe = Path(__file__).with_name("cli_threads_probe.py")
    done = _torchrun_merge([str(probe)], saved_adapter, tmp_path / "out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted(line for line in done.stderr.splitlines() if "gloo threads left" in line)
    assert reports == ["rank 0: gloo threads left []", "rank 1: gloo threads left []"], done.stderr[-3000:]


# -- the schedule (no processes) ---------------------------------------------------------------


def test_schedule_produces_owned_tensors_and_takes_part_in_the_others_once():
    from fastsave.io.shards import assign_shards
    from fastsave.pipeline.schedule import Action, schedule

    calls: list[str] = []

    def item(name: str, **fields) -> PlanItem:
        return PlanItem(name, (4,), torch.bfloat16, lambda: torch.zeros(4, dtype=torch.bfloat16), **fields)

    group = SharedProducer(lambda: {}, participate=lambda: calls.append("group"))
    alone = SharedProducer(lambda: {}, participate=lambda: calls.append("alone"))
    items = [
        item("a", participate=lambda: calls.append("a")),
        group.item("g1", (4,), torch.bfloat16),
        group.item("g2", (4,), torch.bfloat16),
        item("b"),
        alone.item("h1", (4,), torch.bfloat16),
        alone.item("h2", (4,), torch.bfloat16),
    ]
    plan = Plan(items, torch.bfloat16, [])
    shards = assign_shards(items, 8)  # 8 bytes: one tensor a shard
    owners = [0, 0, 1, 1, 0, 0]  # rank 1 writes g2 and b
    steps = schedule(plan, shards, owners, rank=1)
    assert [s.action for s in steps] == [
        Action.COLLECTIVES_ONLY,  # a: its gather, not its values
        Action.SKIP,  # g1: rank 1 makes the group for g2 (keeping only g2)
        Action.PRODUCE,
        Action.PRODUCE,
        Action.COLLECTIVES_ONLY,  # h1, h2: no part is rank 1's: the group's collectives once
        Action.SKIP,
    ]
    assert all(s.agree for s in steps)  # one tensor a shard: the ranks meet after each
    assert group._keep == {"g2"} and alone._keep is None
    alone.take_part()
    alone.take_part()
    assert calls == ["alone"]


def _lora_worker(rank: int, world: int, out: str) -> str:
    from fastsave.errors import PlanError

    model = tiny_peft()
    _fully_shard(model)
    try:
        fastsave.save_pretrained_merged(model, f"{out}/adapter", save_method="lora")
    except PlanError as error:
        return str(error)
    raise AssertionError("a lora save of a sharded model was not refused")


def test_a_lora_save_of_a_sharded_model_is_refused_before_any_work(tmp_path):
    messages = values(run_ranks(_lora_worker, str(tmp_path)))
    assert all("save_method='lora' is not supported for a sharded" in m for m in messages), messages
    assert not (tmp_path / "adapter").exists() and leftovers(tmp_path) == []
