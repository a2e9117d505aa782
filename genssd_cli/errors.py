"""The error hierarchy the CLI maps to one-line messages and exit codes.

A `UsageError` is the user's to fix (bad config, flag, data): exit 2. A `RuntimeFailure` is
something that went wrong while doing the work (endpoint unreachable, model missing): exit 1.
Anything else is a bug and keeps its traceback.
"""


class GenssdError(Exception):
    exit_code = 1


class UsageError(GenssdError):
    exit_code = 2


class RuntimeFailure(GenssdError):
    exit_code = 1


class TeacherFatalError(RuntimeFailure):
    """The teacher endpoint refused in a way retrying cannot fix (auth, unknown model, bad request)."""


class RequestRefused(TeacherFatalError):
    """A 400 that is not about the context length: the request itself is not accepted."""


class TeacherUnavailable(RuntimeFailure):
    """Retries ran out: the trajectory fails, the run goes on."""

    def __init__(self, message: str, error_class: str):
        super().__init__(message)
        self.error_class = error_class


class BudgetReached(RuntimeFailure):
    """The run's teacher cost reached max_cost; what was received is on disk, the run resumes."""


class Interrupted(GenssdError):
    """The user asked the run to stop (Ctrl-C / SIGTERM); what was received is on disk."""

    exit_code = 130


class StopRequested(Exception):
    """Raised instead of sending a teacher request once a stop was asked for."""


class ContextTooLong(RuntimeFailure):
    """The prompt plus prefix no longer fits the teacher's context: the trajectory ends truncated."""


def unwrap_group(exc: BaseException) -> BaseException:
    """Task groups wrap errors in (nested) exception groups: surface the one that matters."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = exc.exceptions
        exc = next((e for e in leaves if isinstance(e, (GenssdError, KeyboardInterrupt))), leaves[0])
    return exc
