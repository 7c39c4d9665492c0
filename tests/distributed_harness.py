"""Run a function on N CPU ranks (gloo on 127.0.0.1) and collect what each rank returned or raised.

Processes come from one forkserver per test session that has already imported torch,
transformers and peft, so a 2-rank group starts in a fraction of a second instead of paying
those imports on every rank of every test. Each rank's outcome is returned, not re-raised, so a
test can assert that *every* rank failed, and how.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PRELOAD = [
    "torch",
    "torch.distributed",
    "transformers",
    "peft",
    "fastsave.parallel.ranks",
    "fastsave.sources.sharded",
    "fastsave.api",
    "fastsave.inputs.sharded_model",
    "fastsave.cli.merge",
]
_context: multiprocessing.context.BaseContext | None = None


def _mp_context() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    """What one rank did: ``value`` it returned, or ``error`` (type name, message, traceback)."""

    rank: int
    value: Any = None
    error: tuple[str, str, str] | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _rank_main(
    rank: int, world: int, port: int, timeout_s: float, fn: Callable, args: tuple, results: Any
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    start = time.monotonic()
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
        value = fn(rank, world, *args)
        results.put(Outcome(rank, value=value, seconds=time.monotonic() - start))
    except BaseException as exc:
        results.put(
            Outcome(
                rank,
                error=(type(exc).__name__, str(exc), traceback.format_exc()),
                seconds=time.monotonic() - start,
            )
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable, *args: Any, world: int = 2, pg_timeout_s: float = 30.0, join_timeout_s: float = 120.0
) -> list[Outcome]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return each rank's :class:`Outcome`, by rank.

    ``fn`` must be importable by name (a module-level function). A rank that exits without
    reporting (killed) gets an Outcome whose error is ``("died", exit code, "")``. Ranks still
    running after ``join_timeout_s`` are killed and reported as ``("hung", ...)``.
    """
    ctx = _mp_context()
    results = ctx.Queue()
    port = free_port()
    processes = [
        ctx.Process(target=_rank_main, args=(rank, world, port, pg_timeout_s, fn, args, results), daemon=True)
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + join_timeout_s
    while len(outcomes) < world and time.monotonic() < deadline:
        try:
            outcome = results.get(timeout=0.2)
            outcomes[outcome.rank] = outcome
        except queue.Empty:
            if all(not p.is_alive() for p in processes) and results.empty():
                break
    for rank, process in enumerate(processes):
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
            outcomes.setdefault(
                rank, Outcome(rank, error=("hung", f"still running after {join_timeout_s}s", ""))
            )
        outcomes.setdefault(rank, Outcome(rank, error=("died", f"exit code {process.exitcode}", "")))
    return [outcomes[r] for r in range(world)]


def values(outcomes: list[Outcome]) -> list[Any]:
    """Each rank's returned value; fails with every rank's traceback if any rank raised."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        details = "\n".join(f"--- rank {o.rank}: {o.error[0]}: {o.error[1]}\n{o.error[2]}" for o in failed)
        raise AssertionError(f"{len(failed)} rank(s) failed:\n{details}")
    return [o.value for o in outcomes]


# -- models the distributed tests share (built in the rank processes) ---------------------------


def tiny_peft(tie: bool = False) -> Any:
    """The tiny Llama in bf16 with LoRA, seeded: every rank builds the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastsave.tiny import attach_lora, tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return attach_lora(model, seed=0)


def qlora_for_sharding(base_dir: str) -> Any:
    """The tiny base loaded in bitsandbytes 4-bit with LoRA, its packed bytes stored as bf16
    (``bnb_4bit_quant_storage``), which FSDP and ZeRO-3 need to shard them."""
    import torch

    from fastsave.tiny import attach_lora, load_4bit

    return attach_lora(load_4bit(base_dir, quant_storage=torch.bfloat16), seed=0)


def zero3_engine(model: Any) -> Any:
    """``model`` under DeepSpeed ZeRO-3 on the CPU (gloo), its trainable parameters given to SGD."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
        "zero_allow_untested_optimizer": True,  # a plain torch optimizer
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=trainable)
    return engine
