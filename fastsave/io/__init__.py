"""Everything between the producer and the directory: shards, staging, the atomic switch, checks.

A save writes into a staging directory on the target's filesystem and switches it into place in
one step, so ``save_directory`` holds its previous contents or the complete new checkpoint after
any crash, kill, Ctrl-C or full disk. One module per job:

- ``format``, ``names``: the safetensors header and dtypes; the names of shards, indexes, variants;
- ``shards``: the streaming safetensors writer (tensors appended as produced, each header last);
- ``finite``, ``checksums``, ``direct_file``: the NaN/Inf check, the CRC-32s of each shard's data,
  and its aligned (O_DIRECT) writes on the way;
- ``ownership``: which files a checkpoint of each kind consists of (what a save may replace);
- ``target``, ``lock``: the facts about ``save_directory`` checked first; one save per directory;
- ``staging``: the pending save: staging directory, dead ones cleaned up, disk space, the decision
  to publish; ``switch``: the switch itself (renameat2 RENAME_EXCHANGE, or a journaled rename
  sequence) and its recovery; ``filesystem``: the system calls those need;
- ``verify``: re-reading a saved directory (``fastsave verify``);
- ``disk_space``, ``checkpoint_files``, ``model_card``, ``adapter_files``: room on disk; config,
  generation config and tokenizer files; the model card; peft's file format.

Nothing here imports transformers or peft.
"""
