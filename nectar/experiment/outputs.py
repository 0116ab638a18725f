"""Writing results: output folders that appear whole or not at all, and the files of a run directory.

`prepare_out(path, overwrite)` checks an output folder before any compute (not a file, writable,
empty unless `overwrite`, never a folder whose loss would hurt: the working directory or one
above it, a git checkout) and returns an `OutputDir`. Used as a context manager it gives a
temporary sibling folder to write into; on success that folder is renamed into place (an
`overwrite` swaps the old folder out and deletes it), on an error or Ctrl-C it is removed, the
old folder is left as it was, and Ctrl-C surfaces as `OutputInterrupted` (a KeyboardInterrupt
that names the folder, for "interrupted; nothing written to OUT"). `atomic_write` does the same
for one file. Every `nectar` command that writes uses these.

`write_outputs` writes a run directory: summary.json (strict JSON), chunks.csv, trace.csv.gz,
meta.json, the convexity instance and the plots. Shared by `nectar run` (simulator or NVML) and
the on-device runner. This module does not import torch.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from nectar.experiment.summary import record_rows
from nectar.telemetry.trace import TraceRow, write_meta, write_trace
from nectar.telemetry.workload import widest_ffn_flops

if TYPE_CHECKING:  # pragma: no cover
    from nectar.experiment.runner import PolicyRun


# ---------------------------------------------------------------------------- output folders
class OutputInterrupted(KeyboardInterrupt):
    """Ctrl-C while an output folder was being written; nothing was written to `out`."""

    def __init__(self, out: Path):
        super().__init__(str(out))
        self.out = out


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _precious(path: Path) -> str | None:
    """Why deleting `path` would be a disaster (None when it is an ordinary folder)."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the working directory or contains it"
    if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        return "it is a home or root folder"
    if (path / ".git").exists():
        return "it holds a .git checkout"
    return None


def check_out(path: Path, overwrite: bool = False, option: str = "--out", inputs: Sequence[Path] = ()) -> None:
    """ValueError when `path` cannot become this command's output folder (see the module docstring),
    or when it is, or holds, one of the command's `inputs` (which the new folder would replace)."""
    path = Path(path)
    for source in inputs:
        if source is not None and (path.resolve() == Path(source).resolve() or path.resolve() in Path(source).resolve().parents):
            raise ValueError(f"{option} {path} would replace the input {source}; choose another folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
            raise ValueError(f"{option} {path} is not empty ({len(entries)} entries: {shown}); "
                             "pass --overwrite to replace it, or choose another folder")
        why = _precious(path) if entries else None
        if why:
            raise ValueError(f"{option} {path} will not be replaced: {why}; choose a dedicated output folder")
    base = _nearest_existing(path.absolute().parent)
    if not base.is_dir():
        raise ValueError(f"{option} {path}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {base} is not writable")


class OutputDir:
    """An output folder written all at once (see the module docstring). `with OutputDir(p) as tmp:`."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, option: str = "--out",
                 inputs: Sequence[Path] = ()):
        self.path = Path(path)
        self.overwrite = overwrite
        self.option = option
        check_out(self.path, overwrite, option, inputs)
        self.tmp: Path | None = None
        self._made: list[Path] = []   # parent folders this object created (removed again on failure)

    def __enter__(self) -> Path:
        parent = self.path.absolute().parent
        missing = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._made.append(folder)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
        except OSError as exc:
            self.discard()
            raise ValueError(f"{self.option} {self.path}: cannot create a folder in {parent} "
                             f"({exc.strerror or exc})") from None
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self.discard()
        if issubclass(exc_type, KeyboardInterrupt) and not isinstance(exc, OutputInterrupted):
            raise OutputInterrupted(self.path) from exc
        return False

    def commit(self) -> Path:
        """Move the finished temporary folder into place (swapping out an old folder under --overwrite)."""
        assert self.tmp is not None, "commit() outside the with-block"
        check_out(self.path, self.overwrite, self.option)  # nothing appeared meanwhile
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{secrets.token_hex(4)}")
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []


def prepare_out(path: str | os.PathLike, overwrite: bool = False, option: str = "--out",
                inputs: Sequence[Path] = ()) -> OutputDir:
    """The checked `OutputDir` for `path` (raises ValueError at once when it cannot be one);
    `inputs` are folders the command reads, which --out must neither be nor contain."""
    return OutputDir(path, overwrite, option, inputs)


def check_out_file(path: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> None:
    """ValueError when `path` cannot become this command's output file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} exists; pass --overwrite to replace it")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {parent} is not writable")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes a temporary sibling (same suffixes), which then replaces `path` in one
    rename; on any error or Ctrl-C the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".partial-{secrets.token_hex(4)}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------- run directories


def write_chunks_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})


def export_convexity(out: Path, runs: list["PolicyRun"]) -> None:
    """The nectar controller's last chunk problem (first MoE layer) for `verify-convexity --run`."""
    nectar_run = next((r for r in runs if r.spec.is_nectar), None)
    if nectar_run is None or nectar_run.controller.last_instance is None:
        return
    inst = nectar_run.controller.last_instance
    np.savez_compressed(out / "convexity_instance.npz", **{k: np.asarray(v) for k, v in inst.items()})


def expert_labels(runs: list["PolicyRun"]) -> list[str]:
    """One label per expert of the first MoE layer, from the accounted workload: "full", "narrow
    (25 %)" (an FFN narrower than the widest), "zero", "copy" (empty when no chunk has a workload)."""
    for run in runs:
        for row in run.trace:
            if row.workload is not None and row.workload.layers:
                layer = max(row.workload.layers, key=lambda l: len(l.expert_costs))
                top = widest_ffn_flops(layer.expert_costs) if layer.expert_costs else 1.0
                return [_expert_label(c.kind, c.flops / (top or 1.0)) for c in layer.expert_costs]
    return []


def _expert_label(kind: str, share: float) -> str:
    if kind != "ffn":
        return kind
    return "full" if share > 0.99 else f"narrow ({100 * share:.0f} %)"


def write_outputs(out: Path, runs: list["PolicyRun"], summary: dict, command: str,
                  extra_trace: list[TraceRow] | None = None, extra_files: dict[str, dict] | None = None,
                  plots: tuple[str, ...] = (), **meta) -> None:
    """Write the run directory `out` (the temporary folder of an `OutputDir`, normally):
    summary.json, chunks.csv, trace.csv.gz, meta.json, the convexity instance, the run's cost table
    (cost_table.json, when it calibrated), any `extra_files`
    (name → JSON document) and the plots (the run's, plus `plots` families, e.g. "frontier")."""
    from nectar.cli.common import strict_json, to_strict  # torch-free, like this module

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(strict_json(summary, indent=2, sort_keys=True) + "\n")
    table = getattr(runs[0], "cost_table", None) if runs else None
    extra_files = {**({"cost_table.json": table.to_dict()} if table is not None else {}), **(extra_files or {})}
    for name, document in extra_files.items():
        (out / name).write_text(strict_json(document, indent=2, sort_keys=True) + "\n")
    rows = record_rows(runs)
    write_chunks_csv(out / "chunks.csv", rows)
    write_trace(out / "trace.csv.gz", [*(extra_trace or []), *(row for run in runs for row in run.trace)])
    labels = expert_labels(runs)
    write_meta(out / "meta.json", **to_strict(dict(command=command, backend=summary["backend"], gpu=summary["gpu"],
                                                   seed=summary["seed"], experts=labels, **meta)))
    export_convexity(out, runs)
    from nectar.experiment.plots import write_all  # matplotlib only when plots are written

    write_all(rows, summary, out, temp_cap=summary.get("temp_cap_C"), expert_labels=labels)
    if "frontier" in plots and extra_files and "frontier.json" in extra_files:
        from nectar.experiment.frontier_plots import write_frontier_plots

        write_frontier_plots(extra_files["frontier.json"], rows, out)
