"""The one save path: every entry point (the patched method, the function, the command line) runs
:func:`run_save`.

In this order, so that nothing is written before everything checkable was checked and
save_directory only ever holds its previous contents or the complete new checkpoint:

1. preflight (fastsave.pipeline.preflight): save_directory, the lock, a fresh staging directory;
2. the plan (the input's own code, then the output format and the checkpoint layout);
3. the disk space for the planned bytes, then merge and write into staging
   (fastsave.pipeline.write), then config, tokenizer files and the model card;
4. publish (fastsave.io.staging, fastsave.io.switch): verify the staged files, switch them in atomically;
5. on any error or Ctrl-C, what the save created is removed; save_directory is untouched.

Solo or collective (fastsave.parallel.team), the steps are the same: rank 0 does the preflight,
the small files and the publishing (``team.on_publisher``), every rank plans (checked identical)
and writes the shards assigned to it.
"""

from __future__ import annotations

import time
import warnings

from fastsave.collector import older_objects_frozen
from fastsave.formats import format_of, quantization_config_of
from fastsave.inputs.base import SaveInput
from fastsave.io.adapter_files import apply_save_peft_format
from fastsave.io.model_card import write_model_card
from fastsave.options import SaveOptions
from fastsave.parallel.team import SaveTeam
from fastsave.pipeline.preflight import Preflight
from fastsave.pipeline.report import SaveReport, log_summary
from fastsave.pipeline.write import write_merged_weights
from fastsave.plan.given_tensors import substitute_given_tensors
from fastsave.plan.items import Plan
from fastsave.plan.layout import to_checkpoint_layout


def output_plan(save_input: SaveInput, opts: SaveOptions) -> Plan:
    """The plan the writer writes: the checked merged plan, re-quantized for a 4-bit save, in checkpoint layout."""
    plan = save_input.merged_plan(opts)
    output_format = format_of(opts.save_method)
    if output_format is not None:  # merged_4bit_forced, ...: refuses before any work if it must
        plan = output_format.transform(save_input, plan)
    plan = to_checkpoint_layout(save_input.root, plan)
    return substitute_given_tensors(plan, opts.state_dict)  # state_dict=: given tensors win


def plan_signature(plan: Plan, save_input: SaveInput) -> object:
    """What every rank of a collective save must have computed identically: the plan, and the input's own."""
    items = [
        (i.name, i.shape, str(i.dtype), i.lora_module, i.planned_by, i.group is not None) for i in plan.items
    ]
    signature = getattr(save_input, "signature", None)
    return (str(plan.dtype), items, signature() if callable(signature) else None)


def run_save(save_input: SaveInput, opts: SaveOptions) -> str:
    """Save ``save_input`` as ``opts`` asks: plan, merge and write into staging, publish in one step.

    The input's ``team`` (fastsave.parallel.team; solo when it has none) says which ranks take part.
    Python's collector leaves the process's older objects (the model, its libraries) unscanned
    while the save runs (fastsave.collector): a full collection falling due mid-save would hold
    the GIL, and with it the next write, for a scan of the whole heap.

    Returns the saved directory's path, or the hub URL when pushed.
    """
    with older_objects_frozen():
        return _run_save(save_input, opts)


def _run_save(save_input: SaveInput, opts: SaveOptions) -> str:
    team: SaveTeam = getattr(save_input, "team", None) or SaveTeam.solo()
    started = time.perf_counter()
    report = SaveReport()
    team.roll_call(
        "save_pretrained_merged on a sharded model" if hasattr(save_input, "sharded") else "the save"
    )
    preflight = Preflight(opts)
    with team.staging(preflight) as staging:
        if opts.save_method == "lora":  # the adapter's files: small, written by rank 0 alone

            def write_adapter() -> None:
                report.tokenizer_files = save_input.write_adapter(staging, opts)
                apply_save_peft_format(staging, opts.save_peft_format)

            team.on_publisher(write_adapter, "writing the adapter")
        else:
            plan = team.everyone(lambda: output_plan(save_input, opts), "planning the save")
            team.check_same(plan_signature(plan, save_input), "the plan of the save")
            if not opts.safe_serialization and team.publisher:
                warnings.warn(
                    "safe_serialization=False writes legacy torch .bin shards, which hold one shard in RAM "
                    "while saving and load through pickle; prefer safetensors",
                    UserWarning,
                    stacklevel=3,
                )
            report.shards = write_merged_weights(plan, staging, opts, team, preflight.pending)
            report.plan = plan

            def write_files() -> None:
                quantization = quantization_config_of(opts.save_method, save_input, plan)
                report.tokenizer_files = save_input.write_files(staging, plan, opts, quantization)
                report.merged_into = save_input.describe(plan)

            team.on_publisher(write_files, "writing config and tokenizer files")

        def switch_in() -> None:
            if save_input.model is not None:  # never over the user's own README.md
                write_model_card(save_input.model, opts, staging, getattr(report.plan, "dtype", None))
            preflight.pending.publish()
            report.switch = preflight.pending.how

        team.on_publisher(switch_in, "publishing")
    if team.publisher:
        log_summary(opts, report, time.perf_counter() - started, team)
    if opts.push_to_hub:
        from fastsave.hub import upload_directory

        url = team.on_publisher(lambda: upload_directory(opts), "uploading to the hub")
        return team.share_from_publisher(url)
    return str(opts.save_directory)
