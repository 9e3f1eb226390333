"""Reading the journal across runs of the daemon: a torn last line ends one run's file,
not the journal (the next run writes a new file after loading up to that line)."""

from __future__ import annotations

import json
from pathlib import Path

from pagetrackd.journal import SUFFIX, Journal


def _segment(directory: Path, first: int, indices: list[int], torn: bool = False) -> None:
    lines = b"".join(json.dumps({"i": i, "op": "x"}).encode() + b"\n" for i in indices)
    if torn:
        lines += b'{"i": 99, "op": "tor'
    (directory / f"{first:020d}{SUFFIX}").write_bytes(lines)


def test_records_after_a_torn_tail_in_an_older_file_are_read(tmp_path: Path) -> None:
    _segment(tmp_path, 1, [1, 2, 3], torn=True)  # the first run died mid-line
    _segment(tmp_path, 4, [4, 5])  # the second run went on from index 4
    journal = Journal(tmp_path)
    assert [r["i"] for r in journal.read()] == [1, 2, 3, 4, 5]
    assert journal.last_index == 5


def test_the_torn_tail_is_cut_off_so_the_file_is_whole_again(tmp_path: Path) -> None:
    _segment(tmp_path, 1, [1, 2], torn=True)
    journal = Journal(tmp_path)
    assert [r["i"] for r in journal.read()] == [1, 2]
    assert (tmp_path / f"{1:020d}{SUFFIX}").read_bytes().endswith(b"\n")


def test_a_damaged_line_inside_a_file_ends_the_journal(tmp_path: Path) -> None:
    """Not a torn tail: what follows a damaged line cannot be trusted to follow it."""
    path = tmp_path / f"{1:020d}{SUFFIX}"
    path.write_bytes(b'{"i": 1}\nnot json\n{"i": 3}\n')
    _segment(tmp_path, 4, [4])
    assert [r["i"] for r in Journal(tmp_path).read()] == [1]
