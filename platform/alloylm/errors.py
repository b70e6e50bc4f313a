"""The one error hierarchy of AlloyLM, and the exit code each branch means.

    AlloyLMError
    ├── InputError (exit 2)   the config, the command line or an input the user must fix
    │   ├── ConfigError         the run config (names the key, the file and line or the override)
    │   └── UsageError          a command that does not fit the config (wrong stage kind, no such stage)
    └── RunError (exit 1)     the work itself failed; the message names the cause
        ├── StageError          a stage (training or merge) that could not run or failed
        ├── DataPreparationError, SourceError, EvaluationInputError, StorageError (their own modules)
        │   └── CorruptFileError (storage.py)   a truncated or unreadable file, named
        └── TeacherGenerationError (generate/), EngineError (serve/)

`alloylm.cli` maps `InputError` to exit 2 and `RunError` to exit 1 and catches nothing else by
name: a new error class joins the right branch and gets the right exit code for free.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class AlloyLMError(Exception):
    """Base of every error AlloyLM raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class InputError(AlloyLMError):
    """Something the user gave is wrong: fixing the config or the command line fixes it."""

    exit_code = EXIT_USAGE


class RunError(AlloyLMError):
    """The work failed (a stage, the data, storage, an endpoint): the message says why."""

    exit_code = EXIT_FAILED


class ConfigError(InputError):
    """An invalid run config; the message names the dotted key, the file and line or override."""


class UsageError(InputError):
    """A command that does not fit the config, e.g. `alloylm train CONFIG merged` on a merge stage."""


class StageError(RunError):
    """A stage (any kind) that cannot run or failed; the message names the stage and the cause."""


class DataPreparationError(RunError):
    """A data set or the tokenizer could not be prepared."""


class ServeError(RunError):
    """Serving cannot start: a variant without a finished model, or replicas the cluster cannot hold."""
