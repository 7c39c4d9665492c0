"""Everything between the producer and the directory: shards, staging, the atomic switch, checks.

A save writes into a staging directory on the target's filesystem and switches it into place in
one step, so ``save_directory`` holds its previous contents or the complete new checkpoint after
any crash, kill, Ctrl-C or full disk. One module per job:

- ``shards``: the streaming safetensors writer (headers first, tensors appended as produced);
- ``finite``: the NaN/Inf check each floating tensor passes on its way to disk;
- ``checksums``: sha256 of each shard's data, hashed beside the writer, recorded in the shard;
- ``ownership``: which files a checkpoint of each kind consists of (what a save may replace);
- ``target``: the facts about ``save_directory`` checked before any merge runs;
- ``lock``: one save per directory (flock on a file beside it, holding the owner record);
- ``staging``: the pending save: lock, staging directory, cleanup of dead ones, disk-space check;
- ``publish``: the switch (renameat2 RENAME_EXCHANGE, or a journaled rename sequence) and recovery;
- ``filesystem``: the system calls those need (renameat2, hard-linked trees, directory fsync);
- ``verify``: re-reading a saved directory (``fastsave verify``);
- ``disk_space``, ``checkpoint_files``: room on disk; config, generation config and tokenizer files;
- ``model_card``, ``adapter_files``, ``variant``: the model card, peft's file format, weight-name variants.

Nothing here imports transformers or peft.
"""
