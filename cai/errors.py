"""Exceptions. `BadInputError` and subclasses become exit code 2 with one line of text at the CLI."""


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
