"""Errors a user can act on; each is raised before anything is published to save_directory."""


class PlanError(ValueError):
    """The model cannot be saved as asked; nothing has been written."""


class DiskSpaceError(OSError):
    """The checkpoint would not fit on disk; checked before anything is written."""


class UnsupportedAdapterError(PlanError):
    """An adapter fastsave cannot fold into the base weights exactly; nothing has been written."""
