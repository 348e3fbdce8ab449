"""What the ``sdft`` command prints: sdft's own lines and progress bar, not third-party noise.

The libraries under the local backend and the Tinker client talk a lot on their own: progress bars
("Loading weights", GGUF de-quantization), deprecation and advisory warnings, INFO logs of every
HTTP request. :func:`configure_output` (called once by ``sdft.cli.main``) silences them unless the
user asks for them with ``--debug`` or ``SDFT_DEBUG=1``. Errors still surface: exceptions are not
touched, third-party loggers keep their ERROR records, and warnings attributed to sdft's own code
(other than deprecation notices, which the test suite turns into errors) are still shown.

Nothing here runs on ``import sdft``: a library user's process is configured only if they call
:func:`configure_output` themselves.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

DEBUG_ENV = "SDFT_DEBUG"

# Warnings attributed to sdft's own modules (module name ``sdft`` or ``sdft.<anything>``).
SDFT_MODULES = r"sdft(\.|$)"

# Loggers of the libraries sdft uses; in quiet mode they report errors only.
THIRD_PARTY_LOGGERS = (
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "torch",
    "tinker",
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
    "matplotlib",
    "PIL",
    "asyncio",
)

# Read by the Hugging Face libraries when they are first imported (sdft imports them lazily, after
# configure_output). A value the user already set wins.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # The tokenizers library prints a warning to stderr when a process forks after using it.
    "TOKENIZERS_PARALLELISM": "false",
}

_quiet = False


def debug_requested(flag: bool = False) -> bool:
    """True when ``--debug`` was given (``flag``) or ``SDFT_DEBUG`` is set to anything but 0."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_quiet() -> bool:
    """Whether :func:`configure_output` silenced third-party output in this process."""
    return _quiet


def configure_output(*, debug: bool) -> None:
    """Silence third-party progress bars, warnings and logs for the rest of the process
    (``debug=False``), or leave every library's own output as it is (``debug=True``).

    Call it once, at startup: the quiet settings are process-wide (warning filters, logger levels,
    environment defaults that subprocesses inherit).
    """
    global _quiet
    _quiet = not debug
    if debug:
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # Later filters take precedence: hide every warning, then show sdft's own again, except the
    # deprecation notices that third-party code attributes to the sdft line calling it.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=SDFT_MODULES)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=SDFT_MODULES)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # The environment defaults only reach libraries imported later; apply the same settings to
    # those already imported.
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    hub_utils = sys.modules.get("huggingface_hub.utils")
    if hub_utils is not None:
        hub_utils.disable_progress_bars()


@contextlib.contextmanager
def third_party_output_hidden() -> Iterator[None]:
    """Around a third-party call whose progress bar or prints ignore every library switch (e.g.
    transformers' GGUF de-quantization bar): in quiet mode its stdout and stderr are dropped;
    otherwise nothing changes. Exceptions propagate untouched."""
    if not _quiet:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
