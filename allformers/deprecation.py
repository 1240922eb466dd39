"""Old argument names that still work, with a deprecation message.

Every entry point (CLI and Python) spells its common arguments one way: `out`, `max_steps`,
`warmup_steps`, `lr_decay_steps`, `threads`, `data`. The spellings they replaced are mapped here;
`accepts_old_names` lets a function (or a dataclass's __init__) take them for a while."""
from __future__ import annotations

import functools
import warnings

RENAMED = {"max_iters": "max_steps", "warmup_iters": "warmup_steps", "lr_decay_iters": "lr_decay_steps",
           "num_threads": "threads", "out_dir": "out", "data_dir": "data", "data_root": "data"}


def renamed_kwargs(kwargs: dict, where: str, stacklevel: int = 3) -> dict:
    """kwargs with each old name replaced by its new one (a DeprecationWarning names both)."""
    if not any(k in RENAMED for k in kwargs):
        return kwargs
    out = {}
    for key, value in kwargs.items():
        new = RENAMED.get(key)
        if new is None:
            out[key] = value
            continue
        if new in kwargs:
            raise TypeError(f"{where}: both {key}= (the old name) and {new}= given; pass only {new}=")
        warnings.warn(f"{where}: {key}= is deprecated, use {new}=", DeprecationWarning, stacklevel=stacklevel)
        out[new] = value
    return out


def accepts_old_names(fn):
    """Decorator: `fn` also takes the old spellings of its keyword arguments (RENAMED)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **renamed_kwargs(kwargs, fn.__qualname__.replace(".__init__", "")))
    return wrapper


def old_attribute(new: str, old: str) -> property:
    """A read-only property under the old name that warns and returns the new attribute."""
    def get(self):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use .{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)
    return property(get)
