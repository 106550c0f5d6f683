"""User-facing errors.

Anything the user can fix (a missing file, a label map on the wrong grid, too little memory) is raised as
:class:`CimisError`. The command line prints it as one line, plus an optional hint, and exits non-zero;
it never shows a traceback for these.
"""

from __future__ import annotations

import errno
import unicodedata


class CimisError(Exception):
    """An error caused by the input or the environment, worded for the person who can fix it.

    Args:
        message: one sentence saying what is wrong, naming the file or value involved.
        hint: optional sentence saying what to change.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint as a single line for a terminal or an event stream."""
        return self.message if not self.hint else f"{self.message} ({self.hint})"


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_NOT_WRITABLE_TEXT = ("Read-only file system", "os error 30")
# A file where a folder is needed (or the reverse) on an output path: commands check their outputs up front,
# this catches the paths they do not name (a checkpoint folder inside --out).
_PATH_CLASH = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def disk_error_in(exc: BaseException) -> CimisError | None:
    """A full or read-only disk (or a folder without write permission) behind ``exc``, worded for the user.

    Every write of the engine goes to a staging name that is renamed into place when complete, so such a
    failure never damages what was there; the message says so. Errors raised by compiled libraries
    (safetensors) carry only the text of the OS error.
    """
    verb = "write"
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL | _NOT_WRITABLE:
        where = f" {exc.filename}" if exc.filename else ""
        full = exc.errno in _DISK_FULL
        reason = exc.strerror or str(exc)
        verb = "access" if exc.errno in (errno.EACCES, errno.EPERM) else verb  # a read may be refused too
    else:
        text = str(exc)
        full = any(t in text for t in _DISK_FULL_TEXT)
        if not full and not any(t in text for t in _NOT_WRITABLE_TEXT):
            return None
        where, reason = "", ("no space left on device" if full else "read-only file system")
    hint = ("free disk space and run again" if full else "choose a folder you can write to, or fix its permissions")
    return CimisError(f"cannot {verb}{where}: {reason}; nothing that existed was changed", hint)


def path_clash_in(exc: BaseException) -> CimisError | None:
    """A file standing where a folder is needed, or a folder where a file is, behind ``exc``."""
    if not (isinstance(exc, OSError) and exc.errno in _PATH_CLASH):
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return CimisError(f"cannot create{where}: {exc.strerror or exc}",
                      "a file stands where a folder is needed, or a folder where a file is; choose another output path")


def user_error_in(exc: BaseException) -> CimisError | None:
    """The :class:`CimisError` behind ``exc``, if any; a full or read-only disk counts as one.

    Libraries wrap exceptions raised inside callbacks (MONAI's transforms re-raise them as
    ``RuntimeError("applying transform ...")``); the user's problem is the innermost CimisError.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CimisError):
            return exc
        disk = disk_error_in(exc) or path_clash_in(exc)
        if disk is not None:
            return disk
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# Characters that reorder the text shown after them (a name could display as something it is not).
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def printable(text: str, table_cell: bool = False) -> str:
    """``text`` safe to print in a terminal: control characters (which could move the cursor, recolour the
    terminal or hide the rest of a line) are shown as escapes; in a Markdown table cell a ``|`` is escaped
    too, so that it cannot end the cell."""
    def shown(c: str) -> str:
        if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI_CONTROLS:
            return repr(c)[1:-1] if c.isascii() else f"\\u{ord(c):04x}"
        return "\\|" if table_cell and c == "|" else c

    return "".join(map(shown, text))
