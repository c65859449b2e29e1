"""What the store checks before it trusts a directory, a file or a row of its own index.

Why owner and mode: a cached value is unpickled, and the content hash that guards it lives in
the same database, so it proves integrity, not origin. Whoever can write the store directory, the
database or the artifact folder can make the next run execute their code. So the store refuses a
directory or file that is not owned by the current user or that the group or others can write,
and never loosens (or silently keeps) such a mode itself.

Why the hash form: index rows name artifact files. A row is data, and data can be damaged or
crafted; a "hash" such as ``../../x`` must never become a path. Only the exact form the store
writes (32 lower-case hex digits, xxh3-128) is accepted wherever a row becomes a path.
"""

from __future__ import annotations

__all__ = ("HASH_LENGTH", "check_private", "is_hash")

import os
import re
import stat
from pathlib import Path

from flowyml._errors import StoreError

#: Hex digits of an artifact hash (xxh3-128).
HASH_LENGTH = 32
_HASH = re.compile(r"[0-9a-f]{32}")


def is_hash(value: object) -> bool:
    """True when ``value`` is exactly an artifact hash as the store writes it (safe as a file name)."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_private(path: Path, what: str, *, directory: bool) -> None:
    """Refuse ``path`` unless it is owned by this user and not writable by the group or others.

    A path that does not exist passes (the store creates it private). Symbolic links are refused
    for files inside the store (a link can point anywhere); the store directory itself may be a
    link, and its target is what is checked.

    Raises:
        StoreError: naming the path, the owner or mode found, and the fix.
    """
    try:
        st = os.stat(path) if directory else os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot check the flowyml store {what} {path}: {exc}") from exc
    if not directory and stat.S_ISLNK(st.st_mode):
        raise StoreError(
            f"refusing the flowyml store {what} {path}: it is a symbolic link, and a store's files "
            f"must be its own. Remove the link, or use another cache_dir."
        )
    if directory != stat.S_ISDIR(st.st_mode):
        kind = "a directory" if directory else "a regular file"
        raise StoreError(
            f"refusing the flowyml store {what} {path}: it is not {kind}. Use another cache_dir."
        )
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != me:
        raise StoreError(
            f"refusing the flowyml store {what} {path}: it is owned by {_owner(st.st_uid)}, not by you "
            f"({_owner(me)}). Whoever owns or can write a store can make your runs execute their code. "
            f"Use a cache_dir of your own (or, if it is yours, `chown -R {me} {path}`)."
        )
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("the group", 0o020), ("others", 0o002)) if mode & bit)
        raise StoreError(
            f"refusing the flowyml store {what} {path}: mode {mode:04o} lets {who} write it, and whoever "
            f"can write a store can make your runs execute their code. Fix it with "
            f"`chmod go-w {path}` (flowyml never changes the mode of an existing path), or use "
            f"another cache_dir."
        )
