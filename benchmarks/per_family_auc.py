"""AUC of each forgery family of a folder dataset against its real images, for one detector.

    python benchmarks/per_family_auc.py CHECKPOINT DATA_DIR

DATA_DIR is a ``folder:`` dataset written by ``masm synth`` (or ``masm demo``'s ``data/test``); every
record's family comes from its path. Prints one AUC per family (its fakes against all reals).
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from masm.data.spec import open_dataset
from masm.data.transforms import build_transform
from masm.evaluation.scoring import score_records
from masm.models import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    args = parser.parse_args()
    records = open_dataset(f"folder:{args.data}", frames_per_video=1).records
    detector = load_checkpoint(args.checkpoint, merge=True).eval()
    scores, failed = score_records(
        detector, records, build_transform(detector.preprocessing, train=False), device="cpu"
    )
    labels = np.array([r.label for r in records])
    families = np.array([r.family or "" for r in records])
    real = scores[labels == 0]
    for family in sorted(set(families[labels == 1])):
        fake = scores[(labels == 1) & (families == family)]
        y = np.r_[np.zeros(len(real)), np.ones(len(fake))]
        print(f"{family}: {roc_auc_score(y, np.r_[real, fake]):.3f}")
    if failed:
        print(f"{len(failed)} frames failed to load, e.g. {failed[0]}")


if __name__ == "__main__":
    main()
