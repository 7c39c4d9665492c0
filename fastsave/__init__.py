"""fastsave: save QLoRA-trained models as adapters, merged 16-bit or merged 4-bit checkpoints.

import fastsave
fastsave.patch(model)
model.save_pretrained_merged("out", tokenizer, save_method="merged_16bit")
"""

from fastsave.errors import DiskSpaceError, PlanError
from fastsave.patching import patch, unpatch
from fastsave.save import save_pretrained_merged

__version__ = "0.1.0"
__all__ = ["DiskSpaceError", "PlanError", "__version__", "patch", "save_pretrained_merged", "unpatch"]
