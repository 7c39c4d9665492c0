"""fastsave: save QLoRA-trained models as adapters, merged 16-bit or merged 4-bit checkpoints.

import fastsave
fastsave.patch(model)
model.save_pretrained_merged("out", tokenizer, save_method="merged_16bit")
"""

from fastsave._version import __version__
from fastsave.api import save_pretrained_merged
from fastsave.errors import DiskSpaceError, FastsaveError, PlanError
from fastsave.export import push_to_hub_gguf, save_pretrained_gguf
from fastsave.patching import patch, unpatch

__all__ = [
    "DiskSpaceError",
    "FastsaveError",
    "PlanError",
    "__version__",
    "patch",
    "push_to_hub_gguf",
    "save_pretrained_gguf",
    "save_pretrained_merged",
    "unpatch",
]
