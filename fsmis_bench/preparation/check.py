"""``check-data``: verify a prepared data root (or a folder of your own scans) before a run.

:func:`check_dataset` reads every case of one dataset and reports, per case, whether the
image has its label, whether shapes and geometry agree, whether the label values are the
dataset's, which test organs are missing, and whether supervoxels exist with the right
shape. The harness calls it to refuse a broken root; the CLI prints its table.

:func:`check_nifti_folder` does the same for a ``nifti_folder`` (a label map given by the
user), reading each scan exactly as a run would, and adds what matters for scans from
elsewhere: each file's orientation and the one it is brought to, the modality and its
intensity recipe, voxel sizes far apart, and scans that share identical slices.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ._io import case_id_of, gzip_problem, not_a_folder, sorted_case_ids
from .facts import DATASET_FACTS, DatasetFacts, dataset_facts
from .supervoxels import damaged_file_advice, remake_command, supervoxel_path

__all__ = ["DATASET_FACTS", "CaseRow", "CheckReport", "check_dataset", "format_report"]

#: Expected in-plane size (x, y) of every prepared volume of the three datasets.
IN_PLANE_SIZE = (256, 256)
_GEOMETRY_TOLERANCE = 1e-3


@dataclass
class CaseRow:
    """One line of the summary table."""

    case_id: str
    shape: tuple[int, ...] | None = None  # (Z, Y, X)
    spacing: tuple[float, ...] | None = None  # (z, y, x) mm
    labels: list[int] = field(default_factory=list)
    missing_organs: list[str] = field(default_factory=list)
    supervoxels: str = "-"  # "ok", "missing", "shape ..." or "-" (not checked)
    orientation: str | None = None  # nifti_folder: "<file axcodes> -> <orientation used>"
    modality: str | None = None  # nifti_folder: the intensity recipe applied
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`; ``ok`` is False when any problem was found."""

    dataset: str
    root: Path
    rows: list[CaseRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: things a run will tolerate but a user should know (nifti_folder checks)
    warnings: list[str] = field(default_factory=list)
    #: first line of the printed report; the dataset's image folder when None
    title: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_info(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _read_volume(path: Path) -> tuple[sitk.ImageFileReader, np.ndarray]:
    """Header (SimpleITK) and ``(Z, Y, X)`` voxels of a NIfTI file, decompressed once.

    The voxels come from nibabel, which (unlike SimpleITK) refuses a truncated ``.gz``;
    its ``(X, Y, Z)`` array transposed is SimpleITK's ``(Z, Y, X)`` array.
    """
    info = _read_info(path)
    try:
        array = np.asarray(nib.load(str(path)).dataobj)
    except Exception as error:  # noqa: BLE001 - any failure means the file is damaged
        raise RuntimeError(f"{type(error).__name__}: {error}") from None
    return info, array.T


def _geometry_differs(a, b) -> str | None:
    for what, x, y in (
        ("spacing", a.GetSpacing(), b.GetSpacing()),
        ("origin", a.GetOrigin(), b.GetOrigin()),
        ("direction", a.GetDirection(), b.GetDirection()),
    ):
        if not np.allclose(x, y, atol=_GEOMETRY_TOLERANCE):
            return f"{what} {tuple(round(v, 4) for v in x)} vs {tuple(round(v, 4) for v in y)}"
    return None


def _check_case(facts: DatasetFacts, image_dir: Path, sv_dir: Path | None, case_id: str,
                root: Path | None = None, n_sv: int | None = None) -> CaseRow:
    """One case's row; ``root`` and ``n_sv`` (the data root and supervoxel size checked)
    name the command that remakes a damaged supervoxel file."""
    row = CaseRow(case_id=case_id)
    image_path = image_dir / f"image_{case_id}.nii.gz"
    label_path = image_dir / f"label_{case_id}.nii.gz"
    if not label_path.exists():
        row.problems.append(f"{label_path.name} is missing")
        return row
    try:
        image, image_array = _read_volume(image_path)
    except RuntimeError as error:
        row.problems.append(f"{image_path.name} cannot be read ({str(error).strip().splitlines()[-1]})")
        return row
    try:
        label, label_array = _read_volume(label_path)
    except RuntimeError as error:
        row.problems.append(f"{label_path.name} cannot be read ({str(error).strip().splitlines()[-1]})")
        return row
    row.shape = tuple(int(s) for s in image_array.shape)
    row.spacing = tuple(round(float(s), 3) for s in image.GetSpacing()[::-1])
    if image_array.ndim != 3:
        row.problems.append(f"{image_path.name} is {image_array.ndim}-D, expected 3-D")
        return row
    if label_array.shape != image_array.shape:
        row.problems.append(f"label shape {label_array.shape} != image shape {image_array.shape}")
        return row
    if tuple(image_array.shape[:0:-1]) != IN_PLANE_SIZE:
        row.problems.append(
            f"in-plane size {image_array.shape[2]}x{image_array.shape[1]}, expected "
            f"{IN_PLANE_SIZE[0]}x{IN_PLANE_SIZE[1]} (slices must run along the last NIfTI axis)"
        )
    geometry = _geometry_differs(image, label)
    if geometry:
        row.problems.append(f"image and label geometry differ: {geometry}")
    if not np.isfinite(image_array).all():
        row.problems.append(f"{image_path.name} holds NaN or infinite values")
    elif np.ptp(image_array) == 0:
        row.problems.append(f"{image_path.name} is constant")
    if not np.all(np.mod(label_array, 1) == 0):
        row.problems.append(f"{label_path.name} holds non-integer values")
    values = np.unique(label_array.astype(np.int64))
    row.labels = [int(v) for v in values if v != 0]
    known = set(facts.label_map.values()) | {0}
    unknown = [int(v) for v in values if int(v) not in known]
    if unknown:
        row.problems.append(f"unknown label values {unknown} (known: {sorted(known - {0})})")
    present = set(row.labels)
    row.missing_organs = [o for o in facts.test_organs if facts.label_map[o] not in present]
    if row.missing_organs:
        row.problems.append(f"test organ(s) absent: {', '.join(row.missing_organs)}")
    if sv_dir is not None:
        sv_path = supervoxel_path(sv_dir, case_id)
        if not sv_path.exists():
            row.supervoxels = "missing"
            row.problems.append(f"supervoxels {sv_path.name} missing in {sv_dir.name}/")
        else:
            damage = gzip_problem(sv_path)
            try:
                if damage:
                    raise RuntimeError(damage)
                sv_size = _read_info(sv_path).GetSize()[::-1]
            except RuntimeError as error:
                row.supervoxels = "unreadable"
                advice = f": {damaged_file_advice(sv_path, facts.name, root, n_sv)}" if root is not None else ""
                row.problems.append(f"{sv_path.name} cannot be read ({str(error).strip().splitlines()[-1]}){advice}")
            else:
                if tuple(sv_size) != image_array.shape:
                    row.supervoxels = f"shape {tuple(sv_size)}"
                    row.problems.append(f"supervoxels {tuple(sv_size)} != image {image_array.shape}")
                else:
                    row.supervoxels = "ok"
    return row


def check_dataset(
    name: str,
    root: Path,
    require_supervoxels: bool = True,
    n_sv: int | None = None,
) -> CheckReport:
    """Verify the prepared root of dataset ``name`` (``abd_mri``, ``abd_ct``, ``card_mri``).

    Args:
        name: dataset name (key of :data:`DATASET_FACTS`).
        root: the data root holding ``CHAOST2/``, ``SABS/``, ``CMR/``.
        require_supervoxels: also require ``supervoxels_<n_sv>/superpix-MIDDLE_<id>``.
        n_sv: supervoxel folder suffix; the dataset's default when None.
    Returns:
        A :class:`CheckReport`; ``report.problems`` lists each problem prefixed by its case.
    """
    facts = dataset_facts(name)
    root = Path(root).expanduser()
    report = CheckReport(dataset=name, root=root)
    image_dir = facts.image_dir(root)
    if not image_dir.is_dir():
        report.problems.append(f"folder {image_dir} {not_a_folder(image_dir)}")
        return report
    ids = sorted_case_ids(image_dir)
    if not ids:
        report.problems.append(f"no image_<id>.nii.gz files in {image_dir}")
        return report
    label_ids = (case_id_of(p) for p in image_dir.glob("label_*.nii.gz"))
    orphans = sorted((i for i in label_ids if i is not None and i not in ids), key=int)
    for orphan in orphans:
        report.problems.append(f"label_{orphan}.nii.gz has no image_{orphan}.nii.gz")
    sv_dir = facts.supervoxel_dir(root, n_sv) if require_supervoxels else None
    if sv_dir is not None and not sv_dir.is_dir():
        report.problems.append(
            f"supervoxel folder {sv_dir} {not_a_folder(sv_dir)} "
            f"(make it with `{remake_command(name, root, n_sv)}`)"
        )
        sv_dir_for_rows = None
    else:
        sv_dir_for_rows = sv_dir
    for case_id in ids:
        row = _check_case(facts, image_dir, sv_dir_for_rows, case_id, root, n_sv)
        if sv_dir is not None and sv_dir_for_rows is None:
            row.supervoxels = "missing"
        report.rows.append(row)
        report.problems.extend(f"case {case_id}: {p}" for p in row.problems)
    spacings = {r.spacing[1:] for r in report.rows if r.spacing}
    if len(spacings) > 1:
        report.problems.append(f"in-plane spacing differs between cases: {sorted(spacings)}")
    return report


def format_report(report: CheckReport) -> str:
    """A fixed-width table (one row per case) followed by the problems, if any."""
    extra = any(r.orientation or r.modality for r in report.rows)
    header = (
        "case",
        "shape (Z,Y,X)",
        "spacing (z,y,x) mm",
        *(("orientation", "modality") if extra else ()),
        "labels",
        "missing organs",
        "supervoxels",
        "status",
    )
    table = [header]
    for row in report.rows:
        table.append(
            (
                row.case_id,
                "x".join(map(str, row.shape)) if row.shape else "?",
                ", ".join(f"{s:g}" for s in row.spacing) if row.spacing else "?",
                *((row.orientation or "?", row.modality or "?") if extra else ()),
                " ".join(map(str, row.labels)) or "-",
                ", ".join(row.missing_organs) or "-",
                row.supervoxels,
                "ok" if row.ok else "PROBLEM",
            )
        )
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    title = report.title or f"{report.dataset}: {DATASET_FACTS[report.dataset].image_dir(report.root)}"
    lines = [title]
    for i, line in enumerate(table):
        lines.append(
            "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * width for width in widths))
    if report.warnings:
        lines.append(f"{len(report.warnings)} warning(s):")
        lines.extend(f"  - {w}" for w in report.warnings)
    if report.ok:
        lines.append(f"OK: {len(report.rows)} case(s), no problems")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
        lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)


def check_nifti_folder(
    path: Path,
    label_map,
    *,
    modality=None,
    orientation: str | None = None,
    supervoxels: str | None = None,
    n_supervoxels: int | None = None,
    data_root: Path | None = None,
    folds=None,
    fold_ids=None,
    support: str | None = None,
    test_organs=None,
    supp_idx: int | None = None,
    n_shot: int | None = None,
) -> CheckReport:
    """Verify a folder of ``image_<id>`` / ``label_<id>`` NIfTI pairs for ``nifti_folder``.

    Each scan is read by the ``nifti_folder`` plugin exactly as a run reads it (same
    reader, orientation, intensity recipe and checks): what stops a run (unreadable, not
    3-D, NaN, constant, non-integer labels, a label on another grid, two files for one id)
    is a problem here, and what a run warns about is a warning here. Besides, pairs of
    scans are compared as a run compares its support with each query.

    Args:
        path: the folder.
        label_map: organ -> label value (a mapping, mapping text or a YAML/JSON file).
        modality: ``none`` | ``ct`` | ``mri`` | ``auto`` | mapping; default ``none``.
        orientation: axis codes or ``as_stored``; default the plugin's (``LAS``).
        supervoxels: the pseudo-label folder, if training will use one; ``auto``: whether a
            run would make them (``n_supervoxels``: their size, default the plugin's).
        folds, fold_ids, support, test_organs: the plugin's options of the same names.
        supp_idx, n_shot: the run's ``protocol.supp_idx`` (default the built-in config's)
            and ``protocol.n_shot`` (default 1): every support scan they pick in every fold
            must show every test organ, or a run of that fold stops. A support that would
            stop a run is a warning (a folder that only trains a model draws none), and a
            problem when the support was asked for (``support``, ``supp_idx`` or ``n_shot``).
    Returns:
        A :class:`CheckReport`; problems stop a run, warnings do not.
    Raises:
        ConfigError: the options themselves are invalid (label map, modality, orientation).
    """
    from ..errors import ConfigError, DataError
    from ..plugins import registries

    dataset_cls = registries().datasets.get("nifti_folder")
    options = {"path": str(Path(path).expanduser()), "label_map": label_map, "modality": modality or "none",
               "supervoxels": supervoxels}
    if orientation:
        options["orientation"] = orientation
    if n_supervoxels is not None:
        options["n_supervoxels"] = n_supervoxels
    for key, value in (("folds", folds), ("fold_ids", fold_ids), ("support", support), ("test_organs", test_organs)):
        if value is not None:
            options[key] = value
    options = dataset_cls.resolve_options(options, str(data_root) if data_root else None)
    dataset = dataset_cls(str(data_root) if data_root else None, **options)
    dataset.registered_name = "nifti_folder"
    report = CheckReport(dataset="nifti_folder", root=dataset.folder, title=(
        f"nifti_folder: {dataset.folder} (orientation {dataset.orientation}, modality "
        f"{dataset.modality_option}, label map {dataset.label_map})"))
    short = _shortener(dataset.folder)
    with _DataWarnings() as caught:
        try:
            ids = dataset.case_ids()
            folds = dataset.folds
        except (DataError, ConfigError) as error:
            text = short(error.message) + (f" ({error.hint})" if error.hint else "")
            report.problems.append(text.replace("dataset.path=", "--path ").replace("dataset.path", "--path"))
            return report
    report.warnings.extend(short(str(w.message)) for w in caught)
    report.title += "\n" + (
        f"{len(ids)} scans in {len(folds)} folds" if len(folds) > 1 else
        f"{len(ids)} scans in one fold: a test set for a model trained elsewhere (protocol.test_dataset=nifti_folder); "
        "training on it needs folds=loo"
    )
    given_supp_idx = supp_idx is not None
    supp_idx = _default_supp_idx() if supp_idx is None else int(supp_idx)
    if n_shot is not None and n_shot < 1:
        raise ConfigError(f"protocol.n_shot={n_shot}: a run needs one support scan at least",
                          hint="protocol.n_shot=<1..fold size - 1>")
    fixed = dataset.support is not None or dataset.leave_one_out  # protocol.supp_idx then moves nothing
    if given_supp_idx and fixed:
        report.warnings.append(f"--supp-idx {supp_idx} is not used: the support of every fold is "
                               + ("named with --support" if dataset.support is not None else "the first scan, with folds=loo"))
    # a support the user asked about that stops a run fails the check; the default one warns
    asked = report.problems if ((given_supp_idx and not fixed) or n_shot is not None or support is not None) \
        else report.warnings
    supports, unusable = _fold_supports(dataset, folds, supp_idx, n_shot or 1, given_supp_idx)
    asked.extend(unusable)
    loaded = [summary for case_id in ids
              if (summary := _check_scan(dataset, case_id, report, short, supervoxels)) is not None]
    report.warnings.extend(_folder_warnings(dataset, loaded))
    asked.extend(_lacking_supports(dataset, supports, report.rows, supp_idx, fixed))
    for organ in dataset.test_organs:
        if loaded and all(organ in r.missing_organs for r in report.rows if r.shape):
            values = sorted(set().union(*(set(r.labels) for r in report.rows if r.shape)))
            report.problems.append(
                f"no scan shows {organ} (label value {dataset.label_map[organ]}): it cannot be evaluated; "
                f"the label files hold the values {values or 'none'}",
            )
    return report


def _check_scan(dataset, case_id: str, report: CheckReport, short: Callable[[str], str],
                supervoxels: str | None) -> _Summary | None:
    """Read one scan as a run reads it, add its row (and its problems and warnings) to
    ``report``, and let its voxels go (a folder of large CTs would otherwise stay in memory
    whole, 7.5 bytes per voxel). Returns what the checks across scans need, None when the
    scan cannot be read."""
    from ..errors import DataError

    auto = supervoxels == "auto"
    row = CaseRow(case_id=case_id)
    report.rows.append(row)
    with _DataWarnings() as caught:
        try:
            volume = dataset.load(case_id, with_supervoxels=bool(supervoxels) and not auto)
        except DataError as error:
            row.problems.append(short(error.message))
            volume = None
    report.warnings.extend(f"case {case_id}: {short(str(w.message))}" for w in caught)
    if volume is None:
        report.problems.extend(f"case {case_id}: {p}" for p in row.problems)
        return None
    summary = _Summary(case_id, tuple(volume.spacing), volume.modality)
    geometry = dataset.geometry[case_id]
    row.shape = tuple(int(s) for s in volume.image.shape)
    row.spacing = tuple(round(float(s), 3) for s in volume.spacing)
    row.orientation = f"{''.join(geometry.source_axcodes)} -> {dataset.orientation}"
    recipe = dataset.recipe_of(case_id)
    row.modality = (f"as stored ({volume.modality}-like)" if recipe == "none"
                    else f"{recipe} (auto)" if dataset.modality_option == "auto" else recipe)
    row.labels = sorted(dataset.label_values(case_id))
    row.missing_organs = [o for o in dataset.test_organs if dataset.label_map[o] not in set(row.labels)]
    if auto:  # what a run with supervoxels=auto does with this scan's pseudo-labels
        state = dataset.supervoxel_state(case_id)
        row.supervoxels = {"missing": "to be made", "current": "ok", "stale": "to be remade",
                           "foreign": "not auto's"}[state]
        most = volume.image.size // dataset.n_supervoxels  # supervoxels hold n_supervoxels voxels at least
        if most < dataset.few_supervoxels:
            report.warnings.append(
                f"case {case_id}: {volume.image.size} voxels hold at most {most} supervoxels of "
                f"{dataset.n_supervoxels} voxels (--n-sv): self-supervised training would have almost nothing "
                f"to tell apart; a smaller size, e.g. --n-sv {max(1, volume.image.size // 50)}")
        if state == "foreign":
            row.problems.append(f"supervoxels in {short(str(dataset.supervoxel_folder))} were not made by "
                                "supervoxels=auto: a run refuses to overwrite them")
            report.problems.extend(f"case {case_id}: {p}" for p in row.problems)
    elif supervoxels:
        row.supervoxels = "ok"
    del volume
    dataset.release(case_id)
    return summary


def _lacking_supports(dataset, supports: dict[int, list[str]], rows: list[CaseRow], supp_idx: int,
                      fixed: bool) -> list[str]:
    """One line per support scan that lacks a test organ, with every fold it is drawn for
    (a run of such a fold stops before it trains)."""
    read = {r.case_id: r for r in rows if r.shape}
    lacking_supports: dict[tuple, list[int]] = {}  # (scan, shot, shots, organs lacking) -> folds
    for fold, scans in supports.items():
        for shot, scan in enumerate(scans):
            lacking = tuple(o for o in dataset.test_organs if scan in read and o in read[scan].missing_organs)
            if lacking:
                lacking_supports.setdefault((scan, shot, len(scans), lacking), []).append(fold)
    lines = []
    for (scan, shot, shots, lacking), folds_of in lacking_supports.items():
        where = ("named with support=" if dataset.support is not None
                 else "the first scan, with folds=loo" if dataset.leave_one_out
                 else f"at position protocol.supp_idx={supp_idx}" + (f" + {shot}" if shot else ""))
        these = f"fold{'s' if len(folds_of) > 1 else ''} {', '.join(map(str, folds_of))}"
        lines.append(
            f"scan {scan} is the support{f' (shot {shot + 1})' if shots > 1 else ''} of {these} ({where}) but shows "
            f"no {', '.join(lacking)}: a run that evaluates {'one of these folds' if len(folds_of) > 1 else these} "
            "of this folder stops before it trains; name another support scan with support=<id>" + (
                "" if fixed else ", or move the support's position with protocol.supp_idx=<i>")
        )
    return lines


@dataclass(frozen=True)
class _Summary:
    """What :func:`_folder_warnings` compares across scans."""

    case_id: str
    spacing: tuple[float, ...]
    modality: str


def _fold_supports(dataset, folds: list, supp_idx: int, n_shot: int, given: bool) -> tuple[dict, list[str]]:
    """fold -> the support scans (one per shot) a run of it uses, found as a run finds them
    (the plugin's fixed support, else ``supp_idx`` and the next scans); and, apart, what
    stops a run of a fold before any support is drawn (a fold too small for ``supp_idx``
    or ``n_shot``, a named support outside a fold), each said once for all its folds."""
    from ..errors import ConfigError
    from ..protocol.ep1 import support_case_positions

    out: dict[int, list[str]] = {}
    stopped: dict[str, list[int]] = {}  # what stops a run -> the folds it stops
    for k in range(len(folds)):
        cases = dataset.fold_cases(k)
        try:
            fixed = dataset.fold_support(k)
        except ConfigError as error:  # a named support outside this fold
            stopped.setdefault(error.message.replace("dataset.support=", "support=")
                               + (f" ({error.hint})" if error.hint else ""), []).append(k)
            continue
        if fixed is None and not -len(cases) <= supp_idx < len(cases):
            default = "" if given else "the default "
            stopped.setdefault(
                f"a fold of {len(cases)} scans stops a run with {default}protocol.supp_idx={supp_idx} (the support "
                f"at position {supp_idx}); run with protocol.supp_idx=<0..{len(cases) - 1}>, or name the support "
                "scan with support=<id>", []).append(k)
            continue
        if n_shot >= len(cases):
            stopped.setdefault(
                f"a fold of {len(cases)} scans leaves no query scan beside protocol.n_shot={n_shot} support scans, so "
                f"a run of it stops; use protocol.n_shot=<1..{len(cases) - 1}>", []).append(k)
            continue
        positions = support_case_positions(len(cases), supp_idx if fixed is None else cases.index(fixed), n_shot)
        out[k] = [cases[p] for p in positions]
    unusable = [f"fold{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))}: {why}" for why, ks in stopped.items()]
    return out, unusable


def _default_supp_idx() -> int:
    """``protocol.supp_idx`` of the built-in config (the support's position in a fold)."""
    from omegaconf import OmegaConf

    from ..config import config_dir

    try:
        return int(OmegaConf.load(config_dir() / "config.yaml").protocol.supp_idx)
    except Exception:  # noqa: BLE001 - only for a warning
        return 2


class _DataWarnings:
    """Collects the data warnings the plugin gives while it reads (a run prints them);
    other warnings pass on as they came."""

    def __enter__(self) -> list:
        from ..errors import DataWarning

        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always", DataWarning)
        self.caught: list = []
        return self.caught

    def __exit__(self, *exc) -> bool:
        from ..errors import DataWarning

        found = [w for w in self._caught if issubclass(w.category, DataWarning)]
        others = [w for w in self._caught if not issubclass(w.category, DataWarning)]
        self._context.__exit__(*exc)
        self.caught.extend(found)
        for w in others:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


def _shortener(folder: Path):
    """A message of the plugin without what the report already says (the folder, the scan)."""
    prefix = re.compile(r"^nifti_folder(?: scan [^:\s]+| case [^:\s]+)?: (?:case [^:\s]+: )?")

    def short(message: str) -> str:
        return prefix.sub("", message).replace(f"{folder}/", "").replace(f" in {folder}", "")

    return short


#: pairs of scans named one by one (as support and query, whose axes lie far apart)
_MAX_PAIR_LINES = 6


def _folder_warnings(dataset, volumes: list) -> list[str]:
    """Across scans: voxel sizes far apart, modalities mixed, identical slices shared, axes
    far apart as read (any two scans may be a support and its query)."""
    from ..data.consistency import SPACING_FACTOR, shared_slices

    found = []
    if len(volumes) > 1:
        in_plane = [float(np.mean(v.spacing[1:])) for v in volumes]
        if max(in_plane) > SPACING_FACTOR * min(in_plane):
            found.append(
                f"pixel sizes range from {min(in_plane):.2f} to {max(in_plane):.2f} mm: organs appear at different "
                "scales in support and query"
            )
        modalities = sorted({v.modality for v in volumes})
        if len(modalities) > 1:
            found.append(f"the folder mixes modalities ({', '.join(modalities)}): episodes may pair a CT with an MRI")
    for i, first in enumerate(volumes):
        for second in volumes[i + 1:]:
            shared = shared_slices(dataset.slice_digests(first.case_id), dataset.slice_digests(second.case_id))
            if shared:
                found.append(
                    f"scans {first.case_id} and {second.case_id} share {shared} identical slices (the same patient "
                    "twice?); as support and query their Dice measures copying"
                )
    turned = [f"scans {first.case_id} and {second.case_id} {sentence}"
              for i, first in enumerate(volumes) for second in volumes[i + 1:]
              for sentence in dataset.pair_warnings(first.case_id, second.case_id)]
    found.extend(turned[:_MAX_PAIR_LINES])
    if len(turned) > _MAX_PAIR_LINES:
        found.append(f"... and {len(turned) - _MAX_PAIR_LINES} more pairs of scans whose axes lie far apart as read")
    return found
