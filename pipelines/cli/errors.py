"""How a ``maxa`` command fails: one ``error:`` line naming the problem and the fix, and an exit code
(2 bad input, 1 a bug, 130 Ctrl-C, 143 SIGTERM); ``MAXA_DEBUG=1`` shows the traceback instead.

Every command is wrapped in :func:`clean_errors`; this module holds that wrapper and what it needs to
turn an exception into the line (OS errors, errors re-raised from DataLoader workers, SIGTERM)."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import click
import typer
from rich.markup import escape as rich_escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from pipelines.cli.render import err
from runtime import settings
from runtime.errors import MaxaError

#: Long-running commands: SIGTERM (``kill``, a batch scheduler's stop) is handled like Ctrl-C, so
#: the same cleanup runs (leases released, writer pools drained); what a re-run finds of each.
_INTERRUPTIBLE = {
    "extract": "finished shards are kept; re-run the same command to resume.",
    "sweep": "finished shards and probes are kept; re-run the same command to resume.",
    "probe": "nothing was recorded for the unfinished probe; re-run the same command to train it again.",
    "quickstart": "finished stores and probes are kept; re-run the same command to resume.",
}


class _SigtermAsInterrupt:
    """While a long command runs, SIGTERM raises ``KeyboardInterrupt`` in the main thread (once: a
    second SIGTERM during the cleanup is ignored, so it cannot cut the cleanup short).

    When the whole process group is signalled, DataLoader workers die of it too, and torch's SIGCHLD
    handler would raise "worker killed" in the middle of the cleanup, or print it from the loader's
    ``__del__`` after the command returned: it is silenced from the first SIGTERM on, and stays so
    (the process is exiting; the loaders still notice dead workers on their own)."""

    def __init__(self, enabled: bool) -> None:
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import threading

        if self.received:
            return
        self.received = True
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        threading.excepthook = _quiet_after_sigterm
        raise KeyboardInterrupt("SIGTERM")

    def __enter__(self) -> "_SigtermAsInterrupt":
        if self.enabled:
            import signal

            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            import signal

            signal.signal(signal.SIGTERM, self._previous)


def _quiet_after_sigterm(args: Any) -> None:
    """Once SIGTERM is in: a background thread's broken connection to a process the same signal
    killed (multiprocessing's resource sharer handing tensors over from a DataLoader worker) is part
    of the interruption, not news; anything else is printed as usual."""
    import threading
    import traceback

    files = [f.filename.replace("\\", "/") for f in traceback.extract_tb(args.exc_traceback)]
    if issubclass(args.exc_type, (OSError, EOFError)) or any(f.endswith("multiprocessing/resource_sharer.py")
                                                              for f in files):
        return
    threading.__excepthook__(args)


#: Command options that name where a command writes, by their flag (for an OSError without a file name).
_PATH_OPTIONS = {"store_root": "--store-root", "results_root": "--results-root", "out_dir": "--out",
                 "out_path": "--out", "store": "--store"}


def _os_error_line(e: OSError, kwargs: dict[str, Any]) -> str:
    """One line for an OSError: the file the system names or, when it names none (a write on a full
    disk), the path the command writes under; and the fix."""
    import errno

    reason, kind = e.strerror or str(e) or type(e).__name__, type(e).__name__
    known = next(((flag, kwargs[k]) for k, flag in _PATH_OPTIONS.items() if kwargs.get(k) not in (None, "")), None)
    if e.filename:
        where = f": {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") + f" ({kind})"
    elif known:
        where = f" ({kind}) while writing under {known[0]} {known[1]} (the system named no file)"
    else:
        where = f" ({kind}; the system named no file)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space there or choose another {known[0] if known else '--store-root'}, then re-run"
    else:
        fix = "check that path, its permissions and free space, then re-run"
    return f"{reason}{where}; {fix} (MAXA_DEBUG=1 shows the traceback)."


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MaxaError, Ctrl-C and (for long commands) SIGTERM into one line and a non-zero exit (no
    traceback): 2 for bad input, 130 for Ctrl-C, 143 for SIGTERM (128 + the signal), 1 for a bug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sigterm = _SigtermAsInterrupt(fn.__name__ in _INTERRUPTIBLE)
        try:
            with sigterm:
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own exits and usage errors
            raise
        except BaseException as e:
            # after a SIGTERM, whatever surfaces (e.g. a DataLoader worker killed by the same signal) is the interruption
            if sigterm.received or isinstance(e, KeyboardInterrupt):
                signal_name = "SIGTERM" if sigterm.received else "SIGINT, Ctrl-C"
                tail = _INTERRUPTIBLE.get(fn.__name__, "re-run the same command.")
                err.print(f"[yellow]interrupted[/] ({signal_name}): {tail}", soft_wrap=True, highlight=False)
                raise typer.Exit(143 if sigterm.received else 130) from None
            if not isinstance(e, Exception) or settings.debug():
                raise
            if isinstance(e, MaxaError):
                _error_line(str(e))
                raise typer.Exit(e.exit_code) from None
            if isinstance(e, OSError):  # disk full, permissions, a file where a folder should be, ...
                _error_line(_os_error_line(e, kwargs))
                raise typer.Exit(2) from None
            remote = _remote_error_line(e)
            if remote is not None:  # object storage: credentials, endpoint, bucket, a storage option
                _error_line(remote)
                raise typer.Exit(2) from None
            unwrapped = _worker_error(e)
            if unwrapped is not None:  # a MaxaError raised in a DataLoader worker, re-raised by torch
                _error_line(unwrapped[0])
                raise typer.Exit(unwrapped[1]) from None
            # a bug: still one line by default, the traceback on request
            _error_line(f"unexpected {type(e).__name__}: {e}; this is a bug in maxa: re-run with MAXA_DEBUG=1 "
                        "for the traceback and report it.")
            raise typer.Exit(1) from None

    return wrapper


#: Modules whose exceptions are an object store's answer (or silence), not a bug in maxa.
_REMOTE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "google.auth", "google.api_core",
                   "azure")
_STORAGE_FIX = ("--storage-option KEY=VALUE pairs go to the filesystem (s3fs: key, secret, token, anon, endpoint_url, "
                "client_kwargs; see its documentation)")


def _remote_error_line(e: BaseException) -> str | None:
    """One line for an object store's refusal or silence (no credentials, an endpoint that does not
    answer, a bucket that is not there or not yours, a storage option the filesystem does not take),
    naming the fix; ``None`` for anything else."""
    import traceback

    name, module = type(e).__name__, type(e).__module__ or ""
    text = " ".join(str(e).split()) or name
    frames = [f.filename.replace("\\", "/") for f in traceback.extract_tb(e.__traceback__)]
    if isinstance(e, TypeError) and "unexpected keyword argument" in text and \
            any(f"/{m}/" in f for f in frames for m in ("s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore")):
        return f"object storage: {text}: a --storage-option the filesystem does not take; {_STORAGE_FIX}."
    if not module.startswith(_REMOTE_MODULES):
        return None
    if "Credentials" in name:
        return (f"object storage: {text}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), pass "
                "--storage-option key=… --storage-option secret=…, or --storage-option anon=true for a public bucket.")
    if "Endpoint" in name or "Connect" in name or "Timeout" in name:
        return (f"object storage: {text}: the store's endpoint did not answer; check the network and the endpoint "
                "(--storage-option endpoint_url=…).")
    return f"object storage: {name}: {text}; check the URL, the bucket and your access to it ({_STORAGE_FIX})."


def _worker_error(e: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` of a MaxaError that torch re-raised from a DataLoader worker.

    torch re-raises worker exceptions as ``RuntimeError("Caught X in DataLoader worker process N.
    Original Traceback ...")`` when ``X`` cannot be rebuilt from that text; its last line is
    ``module.X: message``.
    """
    text = str(e)
    if not text.startswith("Caught ") or "DataLoader worker" not in text.splitlines()[0]:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    qualname, sep, message = lines[-1].partition(": ")
    module, _, name = qualname.rpartition(".")
    if not sep or not module:
        return None
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - not ours: leave it to the generic handler
        return None
    if isinstance(cls, type) and issubclass(cls, MaxaError):
        return message.strip(), cls.exit_code
    return None


def _error_line(message: str) -> None:
    """Print ``message`` as one ``error:`` line (newlines in wrapped library messages are folded)."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err.print(f"[bold red]error:[/] {rich_escape(text)}", soft_wrap=True, highlight=False, markup=True)


def _click_exceptions(name: str) -> tuple[type, ...]:
    """click's exception class ``name``, and typer's copy of it where typer carries its own click."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        found.append(getattr(vendored, name))
    return tuple(found)


_USAGE_ERRORS = _click_exceptions("UsageError")
_NO_ARGS_IS_HELP = _click_exceptions("NoArgsIsHelpError")


class OneLineUsageErrors(TyperGroup):
    """The ``maxa`` group: a command line click refuses (an option's value out of its range or of the
    wrong type, an unknown option or command, a missing argument) is one ``error:`` line naming it and
    the command's help, exit 2, like every other bad input, not a boxed usage panel. A bare group
    (``maxa stores``) still prints its help."""

    def make_context(self, info_name: Any, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:  # ``maxa --nope``
            return super().make_context(info_name, args, parent=parent, **extra)
        except _NO_ARGS_IS_HELP:
            raise
        except _USAGE_ERRORS as e:
            _usage_line(e, info_name or "maxa")
            raise typer.Exit(e.exit_code) from None

    def invoke(self, ctx: Any) -> Any:
        try:  # ``maxa probe --max-epochs -1``, ``maxa probee``
            return super().invoke(ctx)
        except _NO_ARGS_IS_HELP:
            raise
        except _USAGE_ERRORS as e:
            _usage_line(e, (getattr(e, "ctx", None) or ctx).command_path)
            raise typer.Exit(e.exit_code) from None


def _usage_line(e: Exception, where: str) -> None:
    message = " ".join(e.format_message().split())
    _error_line(f"{message} See `{where} -h`." if message.endswith((".", "?", "!")) else
                f"{message}; see `{where} -h`.")
