"""A finished run's ``cases.csv`` rebuilt from the evaluation parts the run kept.

``cases.csv`` is the concatenation of ``parts/cases_<group>.csv``, one per trained group
(setting 2 trains one model per organ group). When the report's own check finds a finished
run's ``cases.csv`` damaged, the runner rebuilds it from the parts, which are checked the
same way first; where they cannot rebuild it, one :class:`DamagedRecordError` says what to
delete so that the next run computes it again.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .errors import FsmisError
from .records import CASE_COLUMNS, COMPLETE, atomic_write, read_json


class DamagedRecordError(FsmisError):
    """A finished run's record is damaged and cannot be rebuilt from what the run kept."""


def part_cases(run_dir: Path, groups: list[str]) -> list[pd.DataFrame]:
    """Each group's ``parts/cases_<group>.csv``."""
    return [pd.read_csv(run_dir / "parts" / f"cases_{g}.csv", dtype={"case_id": str}) for g in groups]


def part_problem(path: Path, evaluated: dict[str, list[str]]) -> str | None:
    """Why ``parts/cases_<group>.csv`` cannot stand for its group's evaluation, or None.

    ``evaluated``: the group's organs and their query volumes (``run.json`` ``evaluated``
    for the group). A part is written whole (atomically) with a final newline, so one that
    is empty, ends mid-row, lacks columns or rows, or fails the report's checks was damaged
    after it was written; the runner evaluates that group again rather than finishing the
    run with it.
    """
    from .reporting.collect import check_cases

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if not text.strip():
        return "empty"
    if not text.endswith("\n"):
        return "cut short in the middle of a row"
    try:
        frame = pd.read_csv(io.StringIO(text), dtype={"case_id": str})
    except ValueError as exc:  # pandas' parser and empty-data errors
        return f"unreadable ({type(exc).__name__}: {exc})"
    problem = check_cases(frame, {"evaluated": evaluated})
    if problem is None:
        return None
    return problem.replace("cases.csv row", "row", 1).replace("cases.csv ", "", 1)


def rebuild_cases(run_dir: Path, problem: str, *, default_groups: list[str]) -> None:
    """Write a finished run's damaged ``cases.csv`` (``problem`` says how) again from its
    evaluation parts ``parts/cases_<group>.csv``, and say so on stderr. ``default_groups``:
    the groups to expect where ``run.json`` (older records) names none. The caller holds the
    run's lock.

    Raises:
        DamagedRecordError: the parts are missing or damaged too, or something else is.
    """
    from .reporting.collect import check_cases
    from .runs_command import record_problem

    cases_path, parts = run_dir / "cases.csv", run_dir / "parts"
    move_away = f"move {run_dir} away and rerun the same command to compute the run again"
    # run.json is rewritten by an unfinished run's rerun, which then reuses the trained
    # weights and the evaluation parts: nothing is computed again
    rewrite = (f"delete {run_dir / 'run.json'} and {run_dir / COMPLETE} and rerun the same command: the record "
               "is written again from the run's trained weights and evaluation parts, nothing is trained again")
    try:
        info = read_json(run_dir / "run.json")
    except (OSError, ValueError) as exc:
        raise DamagedRecordError(f"the record {run_dir / 'run.json'} of a finished run is damaged ({exc})",
                                 hint=rewrite) from None
    if not isinstance(info, dict):
        raise DamagedRecordError(f"the record {run_dir / 'run.json'} of a finished run holds no record",
                                 hint=rewrite)
    groups = info.get("groups") or default_groups
    redo = (f"delete {run_dir / COMPLETE}{{}} and rerun the same command: the evaluation is done again, with "
            "the trained weights kept")
    files = [parts / f"cases_{g}.csv" for g in groups]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DamagedRecordError(f"{cases_path} is damaged ({problem}) and cannot be rebuilt: {missing[0]} is missing",
                                 hint=redo.format(""))
    try:
        frames = part_cases(run_dir, groups)
        cases = pd.concat(frames)
        part_problem = _parts_problem(check_cases(cases, info), files, frames)
    except (OSError, ValueError) as exc:
        part_problem = f"unreadable ({type(exc).__name__}: {exc})"
    if part_problem:
        raise DamagedRecordError(
            f"{cases_path} is damaged ({problem}) and cannot be rebuilt: the evaluation parts it is made of are "
            f"damaged too ({part_problem})",
            hint=redo.format(f" and {parts / 'cases_*.csv'}"),
        )
    atomic_write(cases_path, cases[CASE_COLUMNS].to_csv(index=False))
    still = record_problem(run_dir)
    if still is not None:  # something else than cases.csv
        raise DamagedRecordError(f"the finished run {run_dir} is damaged: {still}", hint=move_away)
    tqdm.write(f"{cases_path} was damaged ({problem}); rebuilt it from the evaluation parts in {parts}",
               file=sys.stderr)


def _parts_problem(problem: str | None, files: list[Path], frames: list[pd.DataFrame]) -> str | None:
    """``problem`` (:func:`~fsmis_bench.reporting.collect.check_cases` on the parts put
    together) worded for the part files: a row of the whole is a row of one of them."""
    if problem is None:
        return None
    head, _, rest = problem.partition(": ")
    number = head[len("cases.csv row "):]
    if head.startswith("cases.csv row ") and number.isdigit():
        row = int(number) - 2  # 0-based, after the header line
        for file, frame in zip(files, frames):
            if row < len(frame):
                return f"{file} row {row + 2}: {rest}"
            row -= len(frame)
    if len(files) == 1:
        return problem.replace("cases.csv", str(files[0]), 1)
    return f"{', '.join(str(f) for f in files)} together: {problem.replace('cases.csv ', '', 1)}"
