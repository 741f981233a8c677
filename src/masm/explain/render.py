"""Pictures of explanation maps: overlays (PNG), video contact sheets, example sheets for reports.

Overlays blend a jet colour map into the image with an opacity that grows with the map, so the image
stays readable where the map is low. Images smaller than :data:`MIN_OVERLAY_SIDE` are enlarged first
(a 64 px crop is unreadable as a PNG otherwise). Sheets are matplotlib figures (Agg, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MIN_OVERLAY_SIDE = 256
MAX_OPACITY = 0.6


def overlay(rgb: np.ndarray, map_: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with ``map_`` (H, W) in [0, 1] blended in as a heat map; uint8, enlarged
    to :data:`MIN_OVERLAY_SIDE` on its short side when smaller."""
    import cv2

    rgb = np.ascontiguousarray(rgb)
    map_ = np.clip(np.asarray(map_, dtype=np.float32), 0.0, 1.0)
    short = min(rgb.shape[:2])
    if short < MIN_OVERLAY_SIDE:
        factor = int(np.ceil(MIN_OVERLAY_SIDE / short))
        size = (rgb.shape[1] * factor, rgb.shape[0] * factor)
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC)
        map_ = cv2.resize(map_, size, interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((map_ * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (MAX_OPACITY * map_)[..., None]
    return (rgb * (1 - alpha) + heat * alpha + 0.5).clip(0, 255).astype(np.uint8)


def save_overlay(path: str | Path, rgb: np.ndarray, map_: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(rgb, map_)).save(path, format="PNG")
    return path


def video_sheet(
    path: str | Path,
    frames: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    frame_ids: Sequence[int],
    scores: Sequence[float],
    *,
    title: str,
    top: int = 4,
) -> Path:
    """The ``top`` highest-scoring frames with their maps above the per-frame score over time."""
    from masm.evaluation.plots import new_figure, save_figure

    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top]
    order.sort()
    columns = max(len(order), 1)
    fig = new_figure(3.0 * columns, 5.6)
    grid = fig.add_gridspec(2, columns, height_ratios=[3, 2])
    for column, i in enumerate(order):
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(overlay(frames[i], maps[i]))
        ax.set_title(f"frame {frame_ids[i]}: {scores[i]:.3f}", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ax.plot(frame_ids, scores, marker=".", color="tab:blue")
    ax.scatter([frame_ids[i] for i in order], [scores[i] for i in order], color="tab:red", zorder=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("frame")
    ax.set_ylabel("P(fake)")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def example_sheet(
    path: str | Path, rows: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, str]]], *, title: str
) -> Path:
    """One row per group (``{row title: [(rgb, map, caption), ...]}``), each image with its map."""
    from masm.evaluation.plots import new_figure, save_figure

    columns = max([len(items) for items in rows.values()] + [1])
    fig = new_figure(2.4 * columns + 0.6, 2.7 * len(rows))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (row_title, items) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                rgb, map_, caption = items[c]
                ax.imshow(overlay(rgb, map_))
                ax.set_title(caption, fontsize=8)
            elif c == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        axes[r][0].text(
            -0.08, 0.5, row_title, rotation=90, ha="right", va="center", transform=axes[r][0].transAxes
        )
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def method_sheet(
    images: Sequence[np.ndarray], masks: np.ndarray, maps: Mapping[str, np.ndarray], path: str | Path
) -> Path:
    """Fakes with the outline of their true region, then each method's map of them (benchmark figure)."""
    import cv2

    from masm.evaluation.plots import new_figure, save_figure

    fig = new_figure(1.9 * (len(maps) + 1), 1.9 * len(images) + 0.3)
    axes = fig.subplots(len(images), len(maps) + 1, squeeze=False)
    for r, (image, mask) in enumerate(zip(images, masks)):
        outlined = cv2.resize(image, (256, 256), interpolation=cv2.INTER_CUBIC)
        big = cv2.resize(mask.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, (0, 255, 0), 2)
        axes[r][0].imshow(outlined)
        for c, (name, method_maps) in enumerate(maps.items(), start=1):
            axes[r][c].imshow(overlay(image, method_maps[r]))
            if r == 0:
                axes[r][c].set_title(name, fontsize=9)
        if r == 0:
            axes[r][0].set_title("fake, true region", fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    return save_figure(fig, path, dpi=80)  # small enough to keep in the repository
