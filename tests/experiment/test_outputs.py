"""Output folders that appear whole or not at all (OutputDir / prepare_out / atomic_write)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nectar.experiment.outputs import OutputDir, OutputInterrupted, atomic_write_text, check_out_file, prepare_out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def test_success_moves_the_finished_folder_into_place(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with prepare_out(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".run.partial-") and not out.exists()
        (tmp / "summary.json").write_text("{}")
    assert _tree(tmp_path / "a") == {"b": b"<dir>", "b/run": b"<dir>", "b/run/summary.json": b"{}"}
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_error_leaves_nothing_and_removes_the_parents_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ValueError, match="boom"), prepare_out(out) as tmp:
        (tmp / "half.csv").write_text("1,2")
        raise ValueError("boom")
    assert _tree(tmp_path) == {}


def test_ctrl_c_says_nothing_was_written_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(OutputInterrupted) as info, prepare_out(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert info.value.out == out and isinstance(info.value, KeyboardInterrupt)
    assert _tree(tmp_path) == before


def test_non_empty_folder_needs_overwrite_which_replaces_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.png").write_text("old plot")
    with pytest.raises(ValueError, match="not empty .*--overwrite"):
        prepare_out(out)
    with prepare_out(out, overwrite=True) as tmp:
        (tmp / "summary.json").write_text("{}")
    assert _tree(tmp_path) == {"run": b"<dir>", "run/summary.json": b"{}"}   # no stale plot beside the new data
    with prepare_out(tmp_path / "empty-ok") as tmp:      # an empty existing folder needs no --overwrite
        pass
    (tmp_path / "empty").mkdir()
    prepare_out(tmp_path / "empty")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: (p.parent / "blocker").write_text("x") or None, None),
])
def test_a_file_in_the_way_is_refused_before_anything_runs(tmp_path, make, message):
    target = tmp_path / "out"
    make(target)
    if message is None:
        target = tmp_path / "blocker" / "run"
        message = "is a file, so the folder cannot be created"
    with pytest.raises(ValueError, match=message):
        prepare_out(target)


def test_folders_whose_loss_would_hurt_are_never_replaced(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    (repo / ".git").mkdir(parents=True)
    (repo / "README.md").write_text("x")
    with pytest.raises(ValueError, match=".git checkout"):
        prepare_out(repo, overwrite=True)
    monkeypatch.chdir(repo / ".git")
    with pytest.raises(ValueError, match="working directory"):
        prepare_out(repo, overwrite=True)
    assert (repo / "README.md").read_text() == "x"


def test_unwritable_location_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match="cannot create a folder|not writable"):
        with OutputDir(Path("/proc/nectar-test/run")):
            pass


def test_atomic_write_replaces_or_keeps(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    from nectar.experiment.outputs import atomic_write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_out_file(path)
    with pytest.raises(ValueError, match="is a folder"):
        check_out_file(tmp_path)
    check_out_file(path, overwrite=True)


def test_plots_name_expert_kinds_and_use_integer_chunk_ticks(tmp_path, monkeypatch):
    from nectar.experiment import plots
    from nectar.experiment.outputs import _expert_label

    assert [_expert_label(k, s) for k, s in (("ffn", 1.0), ("ffn", 0.25), ("zero", 0.0), ("copy", 0.0))] == \
        ["full", "narrow (25 %)", "zero", "copy"]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rows = [{"policy": "nectar", "chunk": i, "expert_counts": [[5, 3, 1, 1]]} for i in range(3)]
    plots.expert_loads(rows, "nectar", tmp_path / "x.png", ["full", "full", "narrow (25 %)", "zero"])
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["expert 0: full", "expert 1: full", "expert 2: narrow (25 %)", "expert 3: zero"]
    figures[0].canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
