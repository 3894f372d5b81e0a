"""pytorch-accelerated's process decorators (``pytorch_accelerated.utils``), on accelerate's process state."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


def local_process_zero_only(func: _F) -> _F:
    """Run ``func`` on the main process of each machine only (None elsewhere)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from phasetrain.accelerator import process_state
        return func(*args, **kwargs) if process_state().is_local_main_process else None
    return wrapper  # type: ignore[return-value]


def world_process_zero_only(func: _F) -> _F:
    """Run ``func`` on the main process of the whole run only (None elsewhere)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from phasetrain.accelerator import process_state
        return func(*args, **kwargs) if process_state().is_main_process else None
    return wrapper  # type: ignore[return-value]


def local_process_zero_first(func: _F) -> _F:
    """Run ``func`` on each machine's main process first, then on the others (a download, say)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from phasetrain.accelerator import process_state
        with process_state().local_main_process_first():
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
