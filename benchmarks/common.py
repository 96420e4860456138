"""Shared helpers of the glm_ext benchmarks: timing, device copy bandwidth, environment, output.

Conventions every benchmark follows (see the project rules):

* Compare against peers measured in the same run (eager PyTorch, ``torch.compile``) and against
  the device copy bandwidth measured in the same run; absolute numbers only describe one machine.
* Never time on zeros: inputs are random.
* On CUDA: warm up, time each iteration with CUDA events, report medians, and never time an
  L2-warm kernel. ``time_fn`` reads a buffer of twice the L2 size before every timed iteration
  (outside the timed region). A read, not a memset: a write would leave L2 full of dirty lines
  whose write-back would then be charged to the timed kernel. The flush also keeps the GPU busy
  while the host enqueues the timed call, so small kernels are not timed waiting for their launch.
  On the CPU the same is done for the last-level cache (twice its size, from sysfs).
* Nothing here hard-codes a device: every function takes the device to run on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "copy_bandwidth_gbs",
    "cpu_llc_bytes",
    "default_device",
    "environment_info",
    "interleaved",
    "l2_cache_bytes",
    "load_averages",
    "print_table",
    "time_fn",
    "select_device",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_device() -> str:
    """``cuda`` where a CUDA device is visible, else ``cpu`` (the ``--device`` default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_device(name: str) -> torch.device:
    """The ``--device`` argument as a device, made current; exits with a message when it names a
    CUDA device and none is visible."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name} but no CUDA device is visible")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_cache_bytes(device: torch.device | str) -> int | None:
    """L2 size of a CUDA device in bytes (None on other devices or where torch does not say)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    return int(size) if size else None


def cpu_llc_bytes() -> int | None:
    """Size of the CPU's largest cache in bytes, from sysfs (None where it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
            factor = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * factor)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _cache_flush(device: torch.device) -> Callable[[], Any] | None:
    """A callable that evicts the last-level cache serving ``device`` (the L2 of a CUDA device,
    the CPU's L3) by reading twice its size, or None for other devices."""
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cache = l2_cache_bytes(device)
        floor = 128 * 2**20
    elif device.type == "cpu":
        cache = cpu_llc_bytes()
        floor = 64 * 2**20
    else:
        return None
    buf = _flush_buffers.get(device)
    if buf is None:
        nbytes = max(2 * (cache or 0), floor)
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        _flush_buffers[device] = buf
    return lambda: buf.sum()


def time_fn(
    fn: Callable[..., Any],
    device: torch.device | str,
    *,
    warmup: int,
    iters: int,
    setup: Callable[[], Sequence[Any] | None] | None = None,
    flush_cache: bool = True,
) -> dict[str, float]:
    """Times ``fn`` on ``device``: median and 20th/80th percentiles of per-iteration times (ms).

    ``setup`` (optional) runs before every call, untimed; when it returns a sequence, ``fn`` is
    called with it as positional arguments, otherwise with none. On CUDA each iteration is timed
    with its own pair of CUDA events (one synchronisation at the end); on the CPU
    ``time.perf_counter`` is used. With ``flush_cache`` the last-level cache (CUDA L2, CPU L3) is
    evicted before each iteration, untimed, after ``setup``.
    """
    device = torch.device(device)
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    flush = _cache_flush(device) if flush_cache else None

    def prepare() -> Sequence[Any]:
        args = setup() if setup is not None else None
        if flush is not None:
            flush()
        return () if args is None else args

    for _ in range(max(0, warmup)):
        fn(*prepare())
    _synchronize(device)

    times_ms: list[float] = []
    if device.type == "cuda":
        events = []
        for _ in range(iters):
            args = prepare()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times_ms = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            args = prepare()
            t0 = time.perf_counter()
            fn(*args)
            _synchronize(device)
            times_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times_ms),
        "p20_ms": _percentile(times_ms, 20),
        "p80_ms": _percentile(times_ms, 80),
    }


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict[str, Any]]:
    """Runs every measure (a callable returning one time in ms) once per round, in turn, ``rounds``
    times, so that a burst of load on a shared machine hits every implementation alike. Returns per
    measure its best (min) and median ms and every round's time; a measure that raises is dropped
    from the later rounds and returns ``{"error": text}``."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for name, measure in measures.items():
            if name in errors:
                continue
            try:
                times[name].append(measure())
            except Exception as exc:  # noqa: BLE001  (one failing peer must not lose the others)
                text = f"{type(exc).__name__}: {exc}".strip()
                errors[name] = text if len(text) <= 2000 else text[:2000] + " ..."
    out: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        if name in errors:
            out[name] = {"error": errors[name]}
        elif values:
            out[name] = {"best_ms": min(values), "median_ms": statistics.median(values), "rounds_ms": values}
    return out


def load_averages() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (as ``uptime`` prints them), where known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def copy_bandwidth_gbs(
    device: torch.device | str, nbytes: int, *, warmup: int = 3, iters: int = 20
) -> dict[str, float]:
    """Device copy bandwidth measured now: ``dst.copy_(src)`` of ``nbytes``, 2*nbytes moved.

    Returns ``{"gbs", "median_ms", "nbytes"}`` (GB = 1e9 bytes). Use a buffer far larger than the
    last-level cache (e.g. 1 GiB on an H100) so that it measures memory, not cache, bandwidth.
    """
    device = torch.device(device)
    numel = max(1, nbytes // 4)
    src = torch.rand(numel, dtype=torch.float32, device=device)  # not zeros
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=warmup, iters=iters, flush_cache=False)
    moved = 2 * numel * 4
    return {"gbs": moved / (timing["median_ms"] * 1e-3) / 1e9, "median_ms": timing["median_ms"], "nbytes": numel * 4}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on (no hostname): device, versions, build, commit, date."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_kind": device.type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = torch.cuda.get_device_name(device)
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_memory_bytes"] = int(props.total_memory)
        info["device_sm_count"] = int(props.multi_processor_count)
        info["device_l2_bytes"] = l2_cache_bytes(device)
    else:
        info["device_name"] = info["cpu_model"]
    try:
        import glm_ext

        info["glm_ext_build_info"] = glm_ext.build_info()
    except Exception as exc:  # noqa: BLE001  (report, do not crash a benchmark over metadata)
        info["glm_ext_build_info"] = {"error": f"{type(exc).__name__}: {exc}"}
    info["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    return info


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None  # NaN/inf are not JSON
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


def write_results(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _format_cell(value: Any, spec: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec and isinstance(value, (int, float)):
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[Any], *, file=None) -> str:
    """Prints ``rows`` (dicts) as an aligned plain-text table and returns the text.

    Each column is a key, ``(key, header)`` or ``(key, header, format_spec)``; missing values and
    None print as ``-``, booleans as yes/no. Numbers are right-aligned, text left-aligned.
    """
    cols = []
    for col in columns:
        if isinstance(col, str):
            cols.append((col, col, None))
        else:
            key, header, *spec = col
            cols.append((key, header, spec[0] if spec else None))
    rows = list(rows)
    cells = [[_format_cell(row.get(key), spec) for key, _, spec in cols] for row in rows]
    numeric = [
        all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
        for key, _, _ in cols
    ]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (_, header, _) in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [line([h for _, h, _ in cols]), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in cells]
    text = "\n".join(lines)
    print(text, file=file, flush=True)
    return text
