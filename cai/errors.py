"""Exceptions. `BadInputError` and subclasses become exit code 2 with one line of text at the CLI."""

import errno
import os
import re


class CaiError(Exception):
    """Base class; the CLI maps it to exit code 1."""

    exit_code = 1


class BadInputError(CaiError):
    """Bad config, path or data: the message is one line saying what and where."""

    exit_code = 2


class ConfigError(BadInputError):
    pass


class ModelLoadError(BadInputError):
    pass


class ArtifactError(BadInputError):
    """An artifact is missing, corrupt, tampered with, or not certified."""


class MemorySequencingError(CaiError):
    """A second base model was loaded while another was still resident."""


class ChatTemplateDisabledError(RuntimeError):
    """Raised by `apply_chat_template` on tokenizers from cai's loader."""


class InvariantError(CaiError):
    """One or more error-severity invariants failed; carries every failing result."""

    def __init__(self, results):
        self.results = list(results)
        lines = [f"{r.name}: {r.evidence}" for r in self.results]
        super().__init__(f"{len(lines)} invariant(s) failed:\n  " + "\n  ".join(lines))


class EnvironmentFault(CaiError):
    """The machine refused, not the input: disk full, permission denied, a read-only file
    system. Nothing cai wrote is trusted half-done; fix the machine and rerun (a run
    continues with --resume)."""

    exit_code = 4


class OutOfMemory(CaiError):
    """A device ran out of memory: the message names the stage, the batch size in use and
    what to lower. Not bad input: the same config may fit on a larger device."""

    exit_code = 5


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`, following causes and contexts. safetensors reports a failed
    write as `SafetensorError("... No space left on device (os error 28)")`, not as an
    OSError: the errno in its text is read back, so a full disk reads the same from any writer."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        if type(err).__name__ == "SafetensorError" and (m := re.search(r"\(os error (\d+)\)", str(err))):
            code = int(m.group(1))
            return OSError(code, os.strerror(code) if code in errno.errorcode else str(err))
        err = err.__cause__ or err.__context__
    return None


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: what the system said, its errno name and the file."""
    name = errno.errorcode.get(err.errno, str(err.errno))
    return f"{err.strerror or err} ({name})" + (f": {err.filename}" if err.filename else "")
