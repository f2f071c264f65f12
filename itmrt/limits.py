"""The ranges itmrt accepts for counts, sizes and tolerances - one home for the CLI's options and the Python API.

A value outside its range is refused before any work with a one-line
:class:`~itmrt.errors.ItmrtError` naming the option, the range and why it
has one: an unbounded size would try to allocate what no machine has (a
``--num-regions`` of 10^8 asks for terabytes), and thread counts far above the
cores make ONNX Runtime spend its time switching between them.
"""

from __future__ import annotations

import math
import numbers
import os

from itmrt.errors import ItmrtError

THREADS_PER_CORE = 4
"""``--threads`` at most this many per core this process may use."""
MAX_REGIONS = 1024
"""Regions per image (bottom-up-attention features have 10-100)."""
MAX_TOKENS = 1024
"""Tokens per caption, ``<start>`` and ``<end>`` included."""
MAX_BATCH = 65536
"""Images or captions per batch, in an encoder call or a TensorRT profile (and in ``itmrt bench``'s gallery and
caption pool, which it makes in memory whole)."""
MAX_MEMORY_MB = 65536
"""A scoring tile's memory budget."""
MAX_COUNT = 1 << 24
"""Results per query, samples, images, captions and other counts of items."""
MAX_COPY_MB = float(1 << 30)
"""Shards copied into memory when they take at most this many MB (``itmrt serve --copy-shards-mb``, ``copy_mb``):
a petabyte, "always copy"."""
MAX_HNSW_M = 1024
"""``--hnsw-m`` at most: FAISS keeps ``2 M`` links of 4 bytes per vector (8 KB at 1024, where 16-64 is usual); a
larger M allocated gigabytes for a few images, and past 2**31 failed inside FAISS."""
MAX_SAMPLE_IMAGES = 100_000
"""Test images ``itmrt sample-data`` makes (twice as many in all): about 60 GB of features, far past any trial."""
MAX_CALLS = 10000
"""Calls of one stage a benchmark makes (``itmrt bench --warmup``, ``--repeats``)."""
MAX_SECONDS = 86400.0
"""Timeouts and delays."""
MAX_SEED = (1 << 32) - 1
"""Seeds of a random sample (``itmrt train --seed``, ``itmrt audit --seed``): NumPy's 32-bit seed range."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports it)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def max_threads() -> int:
    return THREADS_PER_CORE * usable_cores()


def is_integer(value: object) -> bool:
    """An ``int`` or a NumPy integer; not a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_flag(value: object, name: str) -> bool:
    """A yes-or-no keyword of the Python API: ``True`` or ``False`` only (a string such as ``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise ItmrtError(f"{name} must be True or False, not {value!r}")
    return value


def check_top_k(k: int) -> int:
    """Results per query: an integer of at least 1 (k <= 0 ranked nothing, or all but the last -k)."""
    if not is_integer(k):
        raise ItmrtError(f"--top-k must be an integer, not {k!r}")
    if k < 1:
        raise ItmrtError(f"--top-k must be at least 1, not {k}")
    return k


def check_threads(threads: int, flag: str = "--threads") -> int:
    """``threads`` (0: ONNX Runtime's default, one per core) within 0 .. :func:`max_threads`."""
    if not is_integer(threads):
        raise ItmrtError(f"{flag} must be an integer (0: one per core), not {threads!r}")
    limit = max_threads()
    if not 0 <= threads <= limit:
        raise ItmrtError(
            f"{flag} {threads} is outside 0..{limit} ({THREADS_PER_CORE} per core of the {usable_cores()} this "
            f"process may use; more only makes the threads wait for each other): use 0 for one per core"
        )
    return int(threads)


def check_count(value: int, low: int, high: int, flag: str) -> int:
    """An integer option within ``low``..``high`` (a NumPy integer too), as a Python ``int``."""
    if not is_integer(value) or not low <= value <= high:
        shown = int(value) if is_integer(value) else repr(value)  # np.int32(0) is shown as 0
        raise ItmrtError(f"{flag} must be an integer from {low} to {high}, not {shown}")
    return int(value)


def store_count(options: object, name: str, low: int, high: int, flag: str) -> None:
    """Field ``name`` of ``options`` (a dataclass, frozen or not) checked by :func:`check_count` and stored as the
    ``int`` it returns: a NumPy integer is taken, and what is written from the options (JSON, ``bind()``) gets
    Python's."""
    object.__setattr__(options, name, check_count(getattr(options, name), low, high, flag))


def check_real(value: float, low: float, high: float, flag: str, low_open: bool = False) -> float:
    """A finite number within ``low``..``high`` (``low`` itself excluded with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ItmrtError(f"{flag} must be a finite number, not {value!r}")
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise ItmrtError(f"{flag} must be in {left}{low:g}, {high:g}], not {value:g}")
    return float(value)
