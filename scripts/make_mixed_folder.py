"""Build a folder of "foreign" scans from the prepared CHAOS data, for the README's
"Your own data" check: image_<id> / label_<id> pairs stored in mixed orientations, one of
them converted to CT-like Hounsfield units.

    python scripts/make_mixed_folder.py $FSMIS_DATA_ROOT /tmp/my_scans
    python scripts/make_mixed_folder.py $FSMIS_DATA_ROOT /tmp/my_scans_b --labels-like-images

The scans are CHAOS fold 0 (ids 1, 2, 3, 5, 8), so a model trained on CHAOS fold 0 (which
never saw them) can be evaluated on the folder and compared, scan for scan, with its
in-domain result. Each file keeps its voxels exactly (axis flips and permutations only,
with the affine changed to match), except scan 8's intensities:

    id  image stored   label stored   intensities
    1   LAS (as is)    LAS            as is
    2   RAS            RAS            as is (uncompressed .nii)
    3   PIR            PIR            as is
    5   RPI            ASL            as is
    8   LPS            LPS            Hounsfield-like: the MRI's 0..p99.5 mapped linearly onto
                                      [-125, 275] HU (the SABS window), air (< 5) at -1000 HU

``--labels-like-images`` stores each label in its image's orientation (scan 5's as RPI), so
the folder can also be read with ``orientation=as_stored``, i.e. used as delivered.

``--all`` takes all 20 CHAOS scans instead, intensities as they are, each stored in one of
:data:`CYCLE`'s orientations in turn (its label in another), to train on the folder in-domain
(``scripts/own_scans_supervoxels.sh``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

LAYOUT = {"1": ("LAS", "LAS"), "2": ("RAS", "RAS"), "3": ("PIR", "PIR"), "5": ("RPI", "ASL"), "8": ("LPS", "LPS")}
#: ``--all``: (image, label) orientations given to the scans in id order, in turn
CYCLE = (("LAS", "LAS"), ("RAS", "RAS"), ("PIR", "PIR"), ("RPI", "ASL"), ("LPS", "LPS"), ("SAL", "IRP"))


def reoriented(image: nib.Nifti1Image, data: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    """The same voxels stored in orientation ``axcodes``, with the affine that keeps them in place."""
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(axcodes))
    stored = apply_orientation(data, transform)
    return nib.Nifti1Image(stored, image.affine @ inv_ornt_aff(transform, image.shape))


def hounsfield_like(mri: np.ndarray) -> np.ndarray:
    high = float(np.percentile(mri, 99.5))
    hu = -125.0 + np.clip(mri, 0, None) / high * 400.0  # bright spots above p99.5 land above 275 HU
    hu[mri < 5] = -1000.0
    return np.rint(hu).astype(np.int16)


def main(data_root: Path, out: Path, labels_like_images: bool = False, every_scan: bool = False) -> None:
    chaos = data_root / "CHAOST2" / "chaos_MR_T2_normalized"
    out.mkdir(parents=True, exist_ok=False)
    layout = LAYOUT
    if every_scan:
        ids = sorted((p.name[len("image_"):-len(".nii.gz")] for p in chaos.glob("image_*.nii.gz")), key=int)
        layout = {case: CYCLE[i % len(CYCLE)] for i, case in enumerate(ids)}
    for case, (image_codes, label_codes) in layout.items():
        label_codes = image_codes if labels_like_images else label_codes
        image = nib.load(str(chaos / f"image_{case}.nii.gz"))
        label = nib.load(str(chaos / f"label_{case}.nii.gz"))
        pixels = np.asarray(image.dataobj)
        if case == "8" and not every_scan:
            pixels = hounsfield_like(pixels)
        suffix = ".nii" if case == "2" else ".nii.gz"
        nib.save(reoriented(image, pixels, image_codes), str(out / f"image_{case}{suffix}"))
        nib.save(reoriented(label, np.asarray(label.dataobj).astype(np.uint8), label_codes),
                 str(out / f"label_{case}{suffix}"))
        print(f"{case}: image {image_codes}, label {label_codes}"
              + (", Hounsfield-like" if case == "8" and not every_scan else ""))


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(paths) != 2 or set(flags) - {"--labels-like-images", "--all"}:
        sys.exit(__doc__)
    main(Path(paths[0]), Path(paths[1]), labels_like_images="--labels-like-images" in flags,
         every_scan="--all" in flags)
