"""UniversalFakeDetect / CNNDetection (ForenSynths) and Chameleon as distributed: ``0_real/`` and ``1_fake/``.

- ``univfd:ROOT``: ``ROOT/<generator>/[<class>/]{0_real,1_fake}/<images>``. ProGAN, StyleGAN, StyleGAN2
  and CycleGAN split their images by object class (``progan/airplane/0_real``), the others do not
  (``biggan/0_real``). The generator is the first level; an object class is not a generator. ``ROOT``
  may also be one generator's folder, with or without classes (``progan/``, ``biggan/``). A folder whose
  sub-folders all hold ``0_real``/``1_fake`` directly is one generator with classes when every sub-folder is
  named as one of the benchmark's object classes (:data:`OBJECT_CLASSES`), else a root of generators.
- ``chameleon:ROOT``: ``ROOT/{0_real,1_fake}/<images>``, all of it one "generator", ``chameleon``.

A generator folder may hold one class only (UniversalFakeDetect's diffusion sets keep their reals apart);
the index notes it, since that generator's own AUC is then undefined.
"""

from __future__ import annotations

from pathlib import Path

from masm.errors import DataError

from .image_tree import count_stray_files, image_entries, images_index, listing, subfolders
from .index import FrameIndex, SkipLog, VideoEntry
from .labels import FAKE, REAL

CLASS_FOLDERS = (("0_real", REAL), ("1_fake", FAKE))
UNIVFD_LAYOUT = "ROOT/<generator>/[<class>/]{0_real,1_fake}/<images>, or one generator's folder"
CHAMELEON_LAYOUT = "ROOT/{0_real,1_fake}/<images>"

#: The object classes CNNDetection's generators split their images by (ProGAN's 20 PASCAL VOC classes, the
#: LSUN classes of StyleGAN/StyleGAN2, CycleGAN's translation targets): folder names that are not generators.
OBJECT_CLASSES = frozenset(
    "airplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor bedroom church apple orange summer winter zebra".split()
)


def read_univfd(root: Path, *, source: str = "") -> FrameIndex:
    """Read UniversalFakeDetect / CNNDetection folder ``root`` into a :class:`FrameIndex` (see module doc)."""
    if not root.is_dir():
        raise DataError(f"{root}: UniversalFakeDetect folder not found")
    skips = SkipLog()
    images: list[VideoEntry] = []
    for generator, (folder, class_folders) in _generators(root, skips).items():
        for class_folder in class_folders:
            key = "/".join([generator, *class_folder.relative_to(folder).parts])
            images += _class_images(class_folder, generator, key, UNIVFD_LAYOUT, skips)
    return images_index(
        root, source or f"univfd:{root}", images, skips, f"UniversalFakeDetect's {UNIVFD_LAYOUT}"
    )


def read_chameleon(root: Path, *, source: str = "") -> FrameIndex:
    """Read Chameleon folder ``root`` (``0_real/``, ``1_fake/``) into a :class:`FrameIndex`, one generator."""
    if not root.is_dir():
        raise DataError(f"{root}: Chameleon folder not found")
    if not _holds_classes(root):
        raise DataError(f"{root}: expected Chameleon's {CHAMELEON_LAYOUT}; found {listing(root)}")
    skips = SkipLog()
    images = _class_images(root, "chameleon", "chameleon", CHAMELEON_LAYOUT, skips)
    return images_index(root, source or f"chameleon:{root}", images, skips, f"Chameleon's {CHAMELEON_LAYOUT}")


def _holds_classes(folder: Path) -> bool:
    return any((folder / name).is_dir() for name, _ in CLASS_FOLDERS)


def _generators(root: Path, skips: SkipLog) -> dict[str, tuple[Path, list[Path]]]:
    """``{generator: (its folder, the folders holding its 0_real/1_fake)}``."""
    if _holds_classes(root):
        return {root.resolve().name: (root, [root])}
    count_stray_files(root, skips)
    children = subfolders(root)
    if not children:
        raise DataError(f"{root}: expected UniversalFakeDetect's {UNIVFD_LAYOUT}; found {listing(root)}")
    if all(_holds_classes(c) for c in children) and all(c.name in OBJECT_CLASSES for c in children):
        return {root.resolve().name: (root, children)}  # one generator's object classes
    generators = {}
    for child in children:
        if _holds_classes(child):
            generators[child.name] = (child, [child])
            continue
        classes = subfolders(child)
        missing = [c for c in classes if not _holds_classes(c)]
        if not classes or missing:
            where = missing[0] if missing else child
            raise DataError(
                f"{where}: expected 0_real/ and 1_fake/ folders (UniversalFakeDetect's {UNIVFD_LAYOUT}); "
                f"found {listing(where)}"
            )
        count_stray_files(child, skips)
        generators[child.name] = (child, classes)
    return generators


def _class_images(folder: Path, generator: str, key: str, layout: str, skips: SkipLog) -> list[VideoEntry]:
    """The images of ``folder/0_real`` and ``folder/1_fake``; any other folder beside them is an error."""
    stray = [f for f in subfolders(folder) if f.name not in {name for name, _ in CLASS_FOLDERS}]
    if stray:
        raise DataError(
            f"{folder}: expected only 0_real/ and 1_fake/ folders ({layout}); found {listing(folder)}"
        )
    count_stray_files(folder, skips)
    images = []
    for name, label in CLASS_FOLDERS:
        if (folder / name).is_dir():
            images += image_entries(folder / name, label, generator, f"{key}/{name}", skips)
    return images
