"""The exit of a step's command line: an expected error is one line on stderr and a status, not a traceback.

    if __name__ == "__main__":
        sys.exit(run_command("evaluate", main))      # main() -> int | None

Statuses (as `python -m components.curate.core` and `python -m model.train` answer):
  2  bad input: a value that does not hold (ValueError: a recipe that does not validate, a media file that is
     not one...), a file or prefix that is missing or was never published (OSError, StorageError)
  3  refused or failed: a check said no or a service did not answer (the project's other errors: a gate,
     a registry rule, the tracking server down, a training stage that cannot go on; ConnectionError)
Anything else is a bug and keeps its traceback. ONEVISION_TRACEBACK=1 shows the traceback of every error.
The `onevision` command itself answers its users' mistakes with one line and status 1 (onevision_cli).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_BAD_INPUT, EXIT_REFUSED = 2, 3
# `__main__`: the errors of the module run as the command (`python -m components.register.core`)
OUR_PACKAGES = ("onevision", "model", "components", "serving", "pipelines", "onevision_cli", "__main__")


def one_line(err: BaseException) -> str:
    """An error's message on one line, whatever its source (a log tail, a wrapped exception)."""
    return " ".join(str(err).split()) or type(err).__name__


def exit_status(err: BaseException) -> int | None:
    """2 or 3 for an expected error (see the module docstring), None for a bug."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if isinstance(err, (ConnectionError, TimeoutError)):
        return EXIT_REFUSED
    if isinstance(err, (ValueError, OSError)) or "StorageError" in names:
        return EXIT_BAD_INPUT
    if isinstance(err, RuntimeError) and type(err).__module__.split(".")[0] in OUR_PACKAGES:
        return EXIT_REFUSED
    return None


def run_command(name: str, main: Callable[[], int | None]) -> int:
    """main()'s status (None: 0); an expected error: `<name>: <message>` on stderr and its exit_status."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted below: a bug re-raises
        status = exit_status(err)
        if status is None or os.environ.get("ONEVISION_TRACEBACK") == "1":
            raise
        print(f"{name}: {one_line(err)}", file=sys.stderr, flush=True)
        return status
