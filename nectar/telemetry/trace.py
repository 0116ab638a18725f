"""Backend-neutral trace format: one CSV row per telemetry window, plus a run's meta.json.

Hardware runs (hw/) and simulated runs (sim/) write the same format, so analysis/ can replay a
measured trace through the simulator and reconcile the two. A row holds the TelemetryWindow's
fields, the window's kind (calibration | chunk | idle | warmup), policy and chunk index, the
workload's shape (tokens, batch, seq_len), its per-layer per-expert counts as compact JSON, the
full ChunkWorkload as JSON (exact replay), and a JSON dict of extra values. A path ending in
`.gz` is gzip-compressed. Floats are written with repr(), so they read back bit-identical.
"""

from __future__ import annotations

import csv
import gzip
import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload

TRACE_FORMAT = "nectar-trace/1"
KINDS = ("calibration", "chunk", "idle", "warmup")
WINDOW_FLOATS = ("t_start_s", "t_end_s", "energy_J", "mean_power_W", "peak_power_W")
COUNTER_READINGS = ("energy_mJ_start", "energy_mJ_end")  # NVML's raw uint64 stays an exact int
OPTIONAL_FLOATS = ("energy_power_J", "mem_temp_C", "sm_clock_MHz")
OPTIONAL_INTS = ("mem_used_B", "mem_total_B")
COLUMNS = (
    "kind", "policy", "chunk_index",
    "t_start_s", "t_end_s", "duration_s",
    "energy_mJ_start", "energy_mJ_end", "energy_J", "energy_power_J",
    "mean_power_W", "peak_power_W", "temp_C", "mem_temp_C", "mem_used_B", "mem_total_B",
    "sm_clock_MHz", "throttle_reasons", "samples", "flags",
    "tokens", "batch", "seq_len", "expert_counts", "workload_json", "extra_json",
)


@dataclass
class TraceRow:
    """One window of a trace. Iterating gives (window, workload, info) with info = kind, policy,
    chunk_index and the extras in one dict, so `for window, workload, info in read_trace(p)` works."""

    window: TelemetryWindow
    workload: ChunkWorkload | None = None  # None for idle/warmup windows without a workload
    kind: str = "chunk"
    policy: str = ""
    chunk_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "policy": self.policy, "chunk_index": self.chunk_index, **self.extra}

    def __iter__(self) -> Iterator[Any]:
        return iter((self.window, self.workload, self.info()))


# ---------------------------------------------------------------------- encoding
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"trace {what} must be JSON-serialisable: {exc}") from exc


def _validate(row: TraceRow) -> None:
    if not isinstance(row.window, TelemetryWindow):
        raise ValueError(f"trace row needs a TelemetryWindow, got {type(row.window).__name__}")
    if row.workload is not None and not isinstance(row.workload, ChunkWorkload):
        raise ValueError(f"trace workload must be a ChunkWorkload or None, got {type(row.workload).__name__}")
    if row.kind not in KINDS:
        raise ValueError(f"trace kind must be one of {KINDS}, got {row.kind!r}")
    if row.chunk_index is not None and (not isinstance(row.chunk_index, int) or row.chunk_index < 0):
        raise ValueError(f"chunk_index must be a non-negative int or None, got {row.chunk_index!r}")
    clash = set(row.extra) & {"kind", "policy", "chunk_index"}
    if clash:
        raise ValueError(f"extra must not repeat the row's own fields: {sorted(clash)}")


def encode_row(row: TraceRow) -> dict[str, str]:
    """The CSV cells of one row."""
    _validate(row)
    w, load = row.window, row.workload
    names = (*WINDOW_FLOATS, *COUNTER_READINGS, *OPTIONAL_FLOATS, *OPTIONAL_INTS)
    cells: dict[str, Any] = {name: getattr(w, name) for name in names}
    cells.update(
        kind=row.kind, policy=row.policy, chunk_index=row.chunk_index, duration_s=w.duration_s,
        temp_C=w.gpu_temp_C, throttle_reasons=int(w.throttle_reasons), samples=int(w.samples),
        flags=_json(list(w.flags), "flags"), extra_json=_json(row.extra, "extra"),
    )
    if load is not None:
        cells.update(
            tokens=load.tokens, batch=load.batch, seq_len=load.seq_len,
            expert_counts=_json(load.expert_counts(), "expert_counts"),
            workload_json=_json(load.to_dict(), "workload"),
        )
    return {name: _cell(cells.get(name)) for name in COLUMNS}


# ---------------------------------------------------------------------- decoding
def _float(text: str) -> float | None:
    return None if text == "" else float(text)


def _int(text: str) -> int | None:
    return None if text == "" else int(text)


def _reading(text: str) -> int | float | None:
    """A counter reading: int when written as one (exact up to 2^64), else float (nan, simulated)."""
    if text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def decode_row(cells: dict[str, str], line: int = 0) -> TraceRow:
    """One TraceRow from its CSV cells (the inverse of `encode_row`)."""
    try:
        window = TelemetryWindow(
            **{name: float(cells[name]) for name in WINDOW_FLOATS},
            gpu_temp_C=float(cells["temp_C"]),
            **{name: _reading(cells[name]) for name in COUNTER_READINGS},
            **{name: _float(cells[name]) for name in OPTIONAL_FLOATS},
            **{name: _int(cells[name]) for name in OPTIONAL_INTS},
            throttle_reasons=int(cells["throttle_reasons"]),
            samples=int(cells["samples"]),
            flags=list(json.loads(cells["flags"])),
        )
        workload = None
        if cells["workload_json"]:
            workload = ChunkWorkload.from_dict(json.loads(cells["workload_json"]))
            _check_counts(workload, cells["expert_counts"])
        return TraceRow(
            window=window, workload=workload, kind=cells["kind"], policy=cells["policy"],
            chunk_index=_int(cells["chunk_index"]), extra=json.loads(cells["extra_json"] or "{}"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"trace line {line}: cannot decode row ({type(exc).__name__}: {exc})") from exc


def _check_counts(workload: ChunkWorkload, expert_counts: str) -> None:
    if expert_counts and json.loads(expert_counts) != workload.expert_counts():
        raise ValueError("expert_counts column disagrees with workload_json (corrupted trace?)")


# ---------------------------------------------------------------------- files
def _open_text(path: Path, mode: str) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", newline="", encoding="utf-8")
    return open(path, mode, newline="", encoding="utf-8")


class TraceWriter:
    """Streams rows to a trace CSV (`.csv` rows are flushed one by one; `.csv.gz` on close)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open_text(self.path, "w")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._csv.writeheader()
        self.rows = 0

    def write_row(self, row: TraceRow) -> None:
        self._csv.writerow(encode_row(row))
        self.rows += 1
        if self.path.suffix != ".gz":
            self._file.flush()

    def write(self, window: TelemetryWindow, workload: ChunkWorkload | None = None, *, kind: str = "chunk",
              policy: str | None = None, chunk_index: int | None = None, extra: dict | None = None) -> None:
        """Append one window; `policy` defaults to the workload's policy."""
        if policy is None:
            policy = workload.policy if workload is not None else ""
        self.write_row(TraceRow(window, workload, kind, policy, chunk_index, dict(extra or {})))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_trace(path: str | Path, rows: Iterable[TraceRow]) -> int:
    """Write all rows; returns how many."""
    with TraceWriter(path) as writer:
        for row in rows:
            writer.write_row(row)
        return writer.rows


def read_trace(path: str | Path) -> list[TraceRow]:
    """All rows of a trace written by `TraceWriter` / `write_trace`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no trace at {path}")
    with _open_text(path, "r") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a NECTAR trace: missing columns {sorted(missing)}")
        return [decode_row(cells, line) for line, cells in enumerate(reader, start=2)]


# ---------------------------------------------------------------------- meta.json
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_meta(**fields: Any) -> dict[str, Any]:
    """Provenance of a run: format, UTC date, command line, Python/torch/transformers versions, + fields."""
    meta = {
        "format": TRACE_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": list(sys.argv),
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "nectar_version": _version("nectar-moe"),
    }
    meta.update(fields)
    return meta


def write_meta(path: str | Path, **fields: Any) -> Path:
    """Write meta.json (`path` may be a run directory); returns the file written."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = run_meta(**fields)
    text = json.dumps(meta, indent=2, sort_keys=True, default=_not_json(path))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _not_json(path: Path):
    def fail(value: Any) -> Any:
        raise ValueError(f"meta field for {path} is not JSON-serialisable: {value!r}")
    return fail


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix != ".json":
        path = path / "meta.json"
    return json.loads(path.read_text(encoding="utf-8"))
