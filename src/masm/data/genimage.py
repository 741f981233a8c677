"""GenImage as distributed: ``ROOT/<generator>/{train,val}/{ai,nature}/<images>``.

The eight generators' folders are named as their archives unpack (``ADM``, ``BigGAN``, ``glide``,
``Midjourney``, ``stable_diffusion_v_1_4``, ...); any folder holding ``train/`` or ``val/`` is taken, under
its own name. Most copies unpack one level deeper (``ADM/imagenet_ai_0508_adm/{train,val}``): one folder
between the generator and its splits is accepted, and the generator keeps the outer folder's name. ``ROOT``
may also be one generator's folder (``ROOT/{train,val}/{ai,nature}``). ``val`` is GenImage's test split,
so it is the default. ``ai/`` holds the generator's fakes, ``nature/`` its ImageNet reals; both carry the
generator as their family.
"""

from __future__ import annotations

from pathlib import Path

from masm.errors import DataError

from .image_tree import count_stray_files, image_entries, images_index, listing, subfolders
from .index import FrameIndex, SkipLog, VideoEntry
from .labels import FAKE, REAL

SPLITS = ("train", "val")
CLASS_FOLDERS = (("nature", REAL), ("ai", FAKE))
LAYOUT = "ROOT/<generator>/[<folder>/]{train,val}/{ai,nature}/<images>, or one generator's {train,val}/"


def read_genimage(root: Path, *, split: str = "val", source: str = "") -> FrameIndex:
    """Read the ``split`` of GenImage folder ``root`` into a :class:`FrameIndex` (see module doc)."""
    if split not in SPLITS:
        raise DataError(f"{root}: GenImage has no split {split!r} (known: train, val; val is its test split)")
    if not root.is_dir():
        raise DataError(f"{root}: GenImage folder not found")
    skips = SkipLog()
    images: list[VideoEntry] = []
    for generator, folder in generator_folders(root, skips).items():
        split_dir = folder / split
        if not split_dir.is_dir():
            raise DataError(
                f"{folder}: no {split}/ folder for generator {generator!r}; found {listing(folder)}"
            )
        images += _split_images(split_dir, generator, f"{generator}/{split}", skips)
    return images_index(root, source or f"genimage:{root}@{split}", images, skips, f"GenImage's {LAYOUT}")


def _holds_splits(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in SPLITS)


def generator_folders(root: Path, skips: SkipLog) -> dict[str, Path]:
    """``{generator: the folder holding its train/ and val/}``: ``root`` itself, or each folder in it."""
    if _holds_splits(root):
        return {root.resolve().name: root}
    count_stray_files(root, skips)
    found: dict[str, Path] = {}
    for folder in subfolders(root):
        if _holds_splits(folder):
            found[folder.name] = folder
            continue
        inner = [sub for sub in subfolders(folder) if _holds_splits(sub)]
        if len(inner) > 1:
            names = ", ".join(sub.name for sub in inner)
            raise DataError(
                f"{folder}: several folders in it hold train/ or val/ ({names}), so which generator is which "
                f"is ambiguous; expected {LAYOUT} (point genimage: at {folder} if these are the generators)"
            )
        if not inner:
            raise DataError(
                f"{folder}: neither it nor a folder in it holds train/ or val/; expected {LAYOUT}; "
                f"found {listing(folder)}"
            )
        found[folder.name] = inner[0]
    if not found:
        raise DataError(f"{root}: expected GenImage's {LAYOUT}; found {listing(root)}")
    return found


def _split_images(split_dir: Path, generator: str, key: str, skips: SkipLog) -> list[VideoEntry]:
    names = {folder.name for folder in subfolders(split_dir)}
    if names != {name for name, _ in CLASS_FOLDERS}:
        raise DataError(f"{split_dir}: expected exactly ai/ and nature/ folders; found {listing(split_dir)}")
    count_stray_files(split_dir, skips)
    images = []
    for name, label in CLASS_FOLDERS:
        images += image_entries(split_dir / name, label, generator, f"{key}/{name}", skips)
    return images
