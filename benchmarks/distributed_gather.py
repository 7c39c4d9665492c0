"""Gather cost of a sharded model, one module at a time vs a full state dict, on N CPU ranks.

    python benchmarks/distributed_gather.py [--world 2] [--layers 14] [--hidden 1024] ...

Builds a Llama-shaped bf16 model (about 250M parameters with the defaults) with a peft LoRA
(r=16, all linear layers, float32 adapters as peft makes them), shards it with FSDP2
(fully_shard per decoder layer and the root) over gloo, and measures on every rank, in two
separate process groups so each peak is its own:

- ``module``: fastsave.sources.sharded walks the model and gathers each module's own parameters
  (base layer, LoRA A and B separately), touching the data, freeing it before the next;
- ``full``: torch.distributed.checkpoint's get_model_state_dict(full_state_dict=True), the usual
  way to get a whole state dict out of FSDP2 (every rank ends up holding all of it);
- ``save``: the whole collective ``fastsave.save_pretrained_merged`` of the sharded model (plan,
  gathers, merge, each rank writing its shards, publish), into ``--out``;
- ``solo``: the same save of the model unsharded, by one process (run it with ``--world 1``).

Prints time per gather (fitted as latency + bytes / bandwidth over all gathers), total time, and
peak RSS per rank above the sharded model's own footprint (sampled every 2 ms with psutil).
Nothing is downloaded; weights are random.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import socket
import threading
import time

import benchlib  # noqa: F401  (importing it puts this process and the ones it starts offline)
import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the highest value seen since ``reset``."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self._process = psutil.Process()
        self._interval = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def reset(self) -> int:
        now = self._process.memory_info().rss
        self.peak = now
        return now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def build(args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora)


def gather_one(sharded, entry, window_bytes: int, timings: list) -> None:
    """Gather one module (in row windows when it is bigger than window_bytes), touching the data."""
    t0 = time.perf_counter()
    if window_bytes and entry.nbytes > window_bytes:
        # in row windows: only the window is ever whole (FSDP1 cannot: hold its unit once instead)
        with sharded.holding(entry):
            for name, shape, dtype in zip(entry.parameters, entry.shapes, entry.dtypes, strict=True):
                step = max(1, window_bytes // (math.prod(shape[1:]) * dtype.itemsize))
                for first in range(0, shape[0], step):
                    with sharded.gathered_rows(entry, name, first, min(first + step, shape[0])) as rows:
                        float(rows.view(-1)[-1])
    else:
        with sharded.gathered(entry) as tensors:
            for t in tensors.values():
                float(t.view(-1)[-1])
    timings.append((entry.name, entry.nbytes, time.perf_counter() - t0))


def worker(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    from torch.distributed.fsdp import fully_shard

    from fastsave.sources.sharded import ShardedModel

    model = build(args)
    total_params = sum(p.numel() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if mode == "solo":
        if world != 1:
            raise SystemExit("--modes solo saves the unsharded model: run it with --world 1")
    elif args.engine == "fsdp1":
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        # peft's policy: decoder layers and each trainable LoRA leaf are units of their own
        model = FullyShardedDataParallel(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu")
        )
    else:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    import gc

    gc.collect()
    rss = PeakRss()
    dist.barrier()
    baseline = rss.reset()
    timings: list[tuple[str, int, float]] = []
    start = time.perf_counter()
    if mode == "module":
        sharded = ShardedModel(model)
        sharded.check_walk()
        window_bytes = int(args.row_window_mib * 1024 * 1024)
        # groups of consecutive entries: one decoder layer each with --hold-layers, else one entry
        groups: list[list] = []
        for entry in sharded.entries():
            layer = re.match(r"(.*\.layers\.\d+)\.", entry.name)
            key = layer.group(1) if layer and args.hold_layers else entry.name
            if groups and groups[-1][0] == key:
                groups[-1][1].append(entry)
            else:
                groups.append((key, [entry]))
        for _key, members in groups:
            with sharded.holding(members if len(members) > 1 else []):
                for entry in members:
                    gather_one(sharded, entry, window_bytes, timings)
    elif mode in ("save", "solo"):
        import fastsave

        out = os.path.join(args.out, f"{mode}-{world}", "out")
        fastsave.save_pretrained_merged(model, out, max_shard_size=args.shard)
        timings.append(("save", total_bytes, time.perf_counter() - start))
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        held = sum(t.numel() * t.element_size() for t in state.values())
        timings.append(("state_dict", held, time.perf_counter() - start))
        del state
    elapsed = time.perf_counter() - start
    peak = rss.peak
    rss.stop()
    results.put(
        {
            "rank": rank,
            "mode": mode,
            "params": total_params,
            "bytes": total_bytes,
            "baseline_rss": baseline,
            "peak_rss": peak,
            "elapsed": elapsed,
            "timings": timings,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = [
        ctx.Process(target=worker, args=(r, args.world, port, mode, args, results)) for r in range(args.world)
    ]
    for p in processes:
        p.start()
    out = [results.get() for _ in processes]
    for p in processes:
        p.join()
    return sorted(out, key=lambda r: r["rank"])


def fit(timings: list[tuple[str, int, float]]) -> tuple[float, float]:
    """Least-squares fit seconds = latency + bytes / bandwidth; returns (latency s, bandwidth B/s)."""
    x = torch.tensor([float(b) for _, b, _ in timings], dtype=torch.float64)
    y = torch.tensor([s for _, _, s in timings], dtype=torch.float64)
    a = torch.stack([torch.ones_like(x), x], dim=1)
    latency, per_byte = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()
    return latency, 1.0 / per_byte if per_byte > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--engine", choices=["fsdp2", "fsdp1"], default="fsdp2")
    parser.add_argument(
        "--hold-layers", action="store_true", help="module mode: hold each decoder layer (FSDP1)"
    )
    parser.add_argument("--modes", default="module,full", help="module, full, save, solo (comma-separated)")
    parser.add_argument("--out", default="/tmp/fastsave-bench-gather", help="save/solo: where to save")
    parser.add_argument("--shard", default="100MB", help="save/solo: max shard size")
    parser.add_argument(
        "--row-window-mib",
        type=float,
        default=0.0,
        help="module mode: gather tensors above this size in row windows",
    )
    args = parser.parse_args()
    mib = 1024 * 1024
    for mode in args.modes.split(","):
        reports = run(mode, args)
        first = reports[0]
        print(
            f"\n## {args.engine} {mode}: {first['params'] / 1e6:.0f}M params, {first['bytes'] / mib:.0f} MiB, "
            f"{args.world} ranks (gloo, 1 thread each)"
        )
        for r in reports:
            print(
                f"rank {r['rank']}: {r['elapsed']:.2f} s, sharded-model RSS {r['baseline_rss'] / mib:.0f} MiB, "
                f"peak {r['peak_rss'] / mib:.0f} MiB (+{(r['peak_rss'] - r['baseline_rss']) / mib:.0f} MiB)"
            )
        if mode == "module":
            timings = first["timings"]
            # the two vocab-sized tensors are first-touch (page fault) bound here; fit the layers
            layers = [t for t in timings if t[1] <= 16 * mib]
            latency, bandwidth = fit(layers)
            biggest = max(timings, key=lambda t: t[1])
            print(
                f"{len(timings)} gathers, {sum(s for _, _, s in timings):.2f} s in gathers; fit over the "
                f"{len(layers)} gathers <= 16 MiB: {latency * 1e3:.2f} ms + bytes / {bandwidth / 1e9:.2f} GB/s; "
                f"largest module {biggest[0]} {biggest[1] / mib:.1f} MiB in {biggest[2] * 1e3:.1f} ms"
            )
            by_kind: dict[str, list[tuple[int, float]]] = {}
            for name, nbytes, seconds in timings:
                kind = (
                    name.rsplit(".", 1)[-1] if "lora_" not in name else "lora (" + name.split(".")[-2] + ")"
                )
                kind = name.split(".")[-2] if kind in ("base_layer", "default") else kind
                by_kind.setdefault(kind, []).append((nbytes, seconds))
            for kind, rows in sorted(by_kind.items()):
                n = len(rows)
                print(
                    f"  {kind:<16} x{n:<3} {sum(b for b, _ in rows) / n / mib:8.2f} MiB "
                    f"{sum(s for _, s in rows) / n * 1e3:8.2f} ms each"
                )


if __name__ == "__main__":
    main()
