"""Every error fastsave raises for a user to act on, under one base: :class:`FastsaveError`.

Each is raised before anything is published to save_directory (which keeps what it held). Each
also derives from the built-in error a caller would expect (ValueError for a save that cannot be
done as asked, OSError for the disk, RuntimeError for a process or a tool that failed), so code
written against those keeps working.
"""


class FastsaveError(Exception):
    """Base of every error fastsave raises on purpose; nothing was published when one is raised."""


# ---------------------------------------------------------------- the save cannot be done as asked


class PlanError(FastsaveError, ValueError):
    """The model cannot be saved as asked; nothing has been written."""


class NonFiniteError(PlanError):
    """A tensor about to be written holds NaN or Inf; nothing was published."""


class UnsupportedAdapterError(PlanError):
    """An adapter fastsave cannot fold into the base weights exactly; nothing has been written."""


class TargetError(FastsaveError, ValueError):
    """save_directory cannot receive a save (a file, unwritable, a name too long, a mixed checkpoint);
    checked before any merge runs, and nothing was created."""


class MixedKindsError(FastsaveError, ValueError):
    """A merged save into an adapter's directory, or an adapter save into a merged checkpoint's."""


class ShardingError(FastsaveError, RuntimeError):
    """The model's sharding cannot be read (mixed engines, or an unsupported layout)."""


# ---------------------------------------------------------------- the disk and the directory


class DiskSpaceError(FastsaveError, OSError):
    """The checkpoint does not fit on disk: refused before writing, or the disk filled up while
    writing (then nothing was published and save_directory keeps its previous contents)."""


class SaveInProgressError(FastsaveError, RuntimeError):
    """Another save into the same directory is running; this one did nothing."""


class VerifyError(FastsaveError, RuntimeError):
    """A checkpoint directory does not read back as written (its problems are listed)."""


# ---------------------------------------------------------------- ranks of a collective save


class RankFailedError(FastsaveError, RuntimeError):
    """One or more ranks failed during a collective save; nothing was published.

    ``failures`` maps each failing rank to its error as ``"TypeName: message"``. Every rank raises
    this same error (the failing ranks too, with their own exception chained), so a launcher
    such as torchrun reports the real cause whichever rank it shows first.
    """

    def __init__(self, what: str, failures: dict[int, str], world: int) -> None:
        self.failures = dict(failures)
        self.what = what
        details = "; ".join(f"rank {r}: {message}" for r, message in sorted(failures.items()))
        super().__init__(
            f"{what} failed on {len(failures)} of {world} ranks ({details}); nothing was published. "
            "Fix the error on the rank named and run the save again on every rank."
        )


class RankLostError(FastsaveError, RuntimeError):
    """A meeting of the ranks failed: another rank stopped (killed, crashed) or never came."""


class RanksDisagreeError(FastsaveError, RuntimeError):
    """Ranks computed different values for something that must be identical on every rank."""


class CollectiveCallError(FastsaveError, RuntimeError):
    """A collective save was called on some ranks only."""


# ---------------------------------------------------------------- GGUF export with llama.cpp


class LlamaCppNotFoundError(FastsaveError, FileNotFoundError):
    """llama.cpp (or its quantize tool) is not on this machine; the message says how to get it."""


class GGUFConversionError(FastsaveError, RuntimeError):
    """llama.cpp's converter or quantizer failed; the message holds the end of its output."""


class FeedUnavailable(FastsaveError, RuntimeError):
    """This llama.cpp's converter cannot be fed from the merge; the message says why (the GGUF
    export then takes the checkpoint route: never raised to the user)."""


class GGUFVerificationError(FastsaveError, RuntimeError):
    """A GGUF file does not hold what its checkpoint does; the message says what differs."""


class SaveStopped(FastsaveError, RuntimeError):
    """The save stopped while its producer waited for memory (its writer failed: the writer's own
    error is the one reported; never raised to the user)."""
