"""Errors a user can act on; each is raised before anything is published to save_directory."""


class PlanError(ValueError):
    """The model cannot be saved as asked; nothing has been written."""


class NonFiniteError(PlanError):
    """A tensor about to be written holds NaN or Inf; nothing was published."""


class DiskSpaceError(OSError):
    """The checkpoint does not fit on disk: refused before writing, or the disk filled up while
    writing (then nothing was published and save_directory keeps its previous contents)."""


class TargetError(ValueError):
    """save_directory cannot receive a save (a file, unwritable, a name too long, a mixed checkpoint);
    checked before any merge runs, and nothing was created."""


class SaveInProgressError(RuntimeError):
    """Another save into the same directory is running; this one did nothing."""


class VerifyError(RuntimeError):
    """A checkpoint directory does not read back as written (its problems are listed)."""


class UnsupportedAdapterError(PlanError):
    """An adapter fastsave cannot fold into the base weights exactly; nothing has been written."""
