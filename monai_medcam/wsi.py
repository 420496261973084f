"""Whole-slide images: tiled Med-CAM with a slide-level evidence map, resumable.

Data flow::

    MONAI WSIReader (openslide, else tifffile) -> tissue mask at a low level, 8 px per tile (HSV
    saturation above Otsu's threshold) -> tile grid at ``level``, tiles with tissue kept -> fixed batches of
    tiles -> MedCAM -> tile masks into an on-disk array of the level (the slide is never held in
    memory) -> one journal line per finished batch -> when every batch is done: a tiled pyramidal
    TIFF of the evidence, a per-tile CSV and a thumbnail PNG, each written atomically.

Resume: the working state lives in ``<output>/.<slide>.medcam/`` (parameters, the level's mask
as a ``.npy`` memmap, the journal). A run that is killed and started again with the same
arguments redoes only the batches missing from the journal; batches are fixed by the tile grid
and seeded the same way, so the outputs equal an uninterrupted run's (on CPU; on CUDA as far as its
kernels are deterministic, ``MedCAMSettings.seed``). The state is removed once
the outputs are written.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_medcam.engine import MedCAM
from monai_medcam.io import InputError
from monai_medcam.pipeline import check_classifier
from monai_medcam.provenance import RUN_RECORD, remove_run_record, run_record, write_run_record
from monai_medcam.settings import as_bool, is_whole_number
from monai_medcam.visualize import class_names_map, class_text, evidence_not_verified, summary_flag
from monai_medcam.writers import OutputsLocked, atomic_path, only_writer, remove_temporaries

__all__ = ["SlideTile", "WSIReport", "open_slide", "tissue_mask", "tile_grid", "explain_slide", "write_pyramid"]

logger = logging.getLogger(__name__)

TILE_FIELDS = (
    "tile", "row", "col", "x", "y", "width", "height", "x0", "y0", "tissue",
    "label", "prob_input", "prob_evidence", "prob_background", "area", "verified", "settled", "vacuous", "steps", "retries",
)
EVIDENCE_VALUE = 255  # evidence pixels in the slide map (0 elsewhere), visible in slide viewers


@dataclass(frozen=True)
class SlideTile:
    """One tile of the grid at the explained level.

    Attributes:
        index: position in the row-major grid of tissue tiles.
        row, col: grid position.
        y, x: top-left corner in pixels of the level.
        height, width: the part inside the level (edge tiles are smaller; they are padded with
            the slide's background to the full tile for the classifier).
        tissue: fraction of the tile's footprint that is tissue.
    """

    index: int
    row: int
    col: int
    y: int
    x: int
    height: int
    width: int
    tissue: float


@dataclass
class WSIReport:
    """What :func:`explain_slide` did: the outputs, the tiles explained now and those resumed."""

    slide: Path
    level: int
    level_size: tuple[int, int]
    tiles: int
    explained: int
    resumed: int
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def open_slide(path: str | Path, backend: str = "auto"):
    """``(reader, wsi)`` for a pyramidal slide through MONAI's ``WSIReader``.

    ``backend`` is ``"openslide"``, ``"tifffile"`` or ``"auto"`` (openslide, then tifffile).

    Raises:
        InputError: the file is missing, unreadable by every backend, or not pyramidal.
    """
    from monai.data import WSIReader

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such slide file.")
    backends = ("openslide", "tifffile") if backend == "auto" else (backend,)
    problems, refusals = [], []
    for name in backends:
        try:
            reader = WSIReader(backend=name)
            wsi = reader.read(str(path))
            count = reader.get_level_count(wsi)
            pages = count
            if name == "tifffile":  # MONAI counts pages, but reads the first series' levels
                count = min(count, len(wsi.series[0].levels))
                stored = np.dtype(wsi.series[0].dtype)
                if stored.kind == "u" and stored.itemsize > 1:  # 16-bit: MONAI would cast to uint8 (wrapping)
                    reader = WSIReader(backend=name, dtype=stored)  # scaled to 8 bits in _read_region
                    wsi = reader.read(str(path))
        except Exception as err:  # each backend raises its own kinds for files it cannot open
            problems.append(f"{name}: {type(err).__name__}: {err}".strip())
            continue
        cut = _truncated(wsi, path) if name == "tifffile" else None
        if cut:  # an incomplete copy reads as a slide with fewer levels or pixels
            refusals.append(InputError(path, f"the file is truncated ({cut}): an incomplete copy? Copy the slide again."))
        elif count >= 2 and pages != count:
            refusals.append(InputError(
                path, f"the tifffile reader cannot read this layout: {pages} pages but a pyramid of {count} levels "
                "(label, macro or thumbnail pages); use openslide (--backend openslide) or write the levels alone."
            ))
        elif count < 2:
            refusals.append(InputError(
                path, f"not a pyramidal slide: {name} finds {count} level. Write the levels as consecutive tiled "
                "TIFF pages, full resolution first, each lower level marked as reduced resolution (NewSubfileType 1; "
                "tifffile: subfiletype=1), or use a format openslide reads."
            ))
        else:
            reader.medcam_refusals = [str(r.problem) for r in refusals]  # why an earlier backend was passed over
            return reader, wsi
        # with --backend auto, a layout one reader cannot take may suit the next (openslide sees one
        # level where the levels are not marked as reduced resolution; tifffile reads them)
    if refusals:
        raise refusals[-1]
    raise InputError(path, "cannot read the slide (" + "; ".join(problems) + ").")


def _truncated(tiff, path: Path) -> str | None:
    """How a TIFF read by tifffile is cut short: its pages' pixel data, or the next page its last
    page points to, past the end of the file (tifffile then stops the chain of pages there, so a cut
    slide looks like one with fewer levels); ``None`` where it is whole."""
    size = path.stat().st_size
    try:
        pages = list(tiff.pages)
    except Exception as err:  # noqa: BLE001 - a chain of pages that cannot be followed
        return f"its pages cannot be read: {err}"
    for page in pages:
        ends = [int(o) + int(n) for o, n in zip(getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ()))]
        if ends and max(ends) > size:
            return f"page {page.index}'s pixels end at byte {max(ends)} of {size}"
    if pages:  # pixels before their page's index (libtiff, vips): the last page found points past the end
        big, order = bool(tiff.is_bigtiff), "little" if tiff.byteorder == "<" else "big"
        with open(path, "rb") as handle:
            handle.seek(int(pages[-1].offset))
            count = int.from_bytes(handle.read(8 if big else 2), order)
            handle.seek(int(pages[-1].offset) + (8 + 20 * count if big else 2 + 12 * count))
            raw = handle.read(8 if big else 4)
        following = int.from_bytes(raw, order) if len(raw) == (8 if big else 4) else size
        if following >= size:
            return f"page {len(pages)} would begin at byte {following}, past its end ({size})"
    return None


def _read_region(reader, wsi, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
    """RGB pixels ``(3, height, width)`` uint8 of ``level`` at ``(y, x)`` (level pixels)."""
    ratio = reader.get_downsample_ratio(wsi, level)
    location = (int(round(y * ratio)), int(round(x * ratio)))
    if getattr(reader, "backend", "") == "openslide":  # MONAI's reader would make transparent areas black
        return _openslide_rgb(wsi, level, location, height, width)
    data, _ = reader.get_data(wsi, location=location, size=(height, width), level=level)
    data = np.asarray(data)
    if data.dtype != np.uint8:  # a 16-bit slide (read by tifffile as stored): to 8 bits, a channel at a time
        top = int(np.iinfo(data.dtype).max)
        scaled = np.empty(data.shape, np.uint8)
        for c in range(data.shape[0]):
            scaled[c] = (data[c].astype(np.uint32) * 255 + top // 2) // top
        data = scaled
    return data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)


def _openslide_rgb(wsi, level: int, location: tuple[int, int], height: int, width: int) -> np.ndarray:
    """RGB ``(3, height, width)`` uint8 from an ``openslide.OpenSlide`` at level-0 ``location`` ``(y, x)``:
    areas with no image data (transparent: unscanned regions of MRXS, DICOM, Philips or Leica slides)
    take the slide's background colour (``openslide.background-color``, else white), as slide viewers
    show them, not black."""
    from PIL import Image

    region = wsi.read_region((location[1], location[0]), level, (width, height))  # RGBA, not premultiplied
    if region.mode == "RGBA" and region.getextrema()[3][0] < 255:
        colour = str(wsi.properties.get("openslide.background-color") or "FFFFFF")
        try:
            ground = Image.new("RGB", region.size, "#" + colour)
        except ValueError:  # not a hex colour
            ground = Image.new("RGB", region.size, "white")
        ground.paste(region, mask=region.getchannel("A"))
        region = ground
    return np.asarray(region.convert("RGB")).transpose(2, 0, 1)


class _LevelReader:
    """RGB regions ``(3, h, w)`` of one level. MONAI's tifffile reader decodes the whole level on every
    read, so with it the level is decoded once and kept (refused above ``MAX_TIFFFILE_PIXELS``)."""

    MAX_TIFFFILE_PIXELS = 2**28

    def __init__(self, reader, wsi, level: int, path: Path) -> None:
        self.reader, self.wsi, self.level = reader, wsi, level
        self.whole = None
        if getattr(reader, "backend", "") == "tifffile":
            height, width = reader.get_size(wsi, level)
            if height * width * np.dtype(getattr(reader, "dtype", np.uint8)).itemsize > self.MAX_TIFFFILE_PIXELS:
                raise InputError(
                    path, f"the tifffile reader decodes whole levels and level {level} has {width} x {height} pixels; "
                    "install openslide-bin and openslide-python (--backend openslide), or explain a higher level."
                )
            self.whole = _read_region(reader, wsi, level, 0, 0, height, width)

    def __call__(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        if self.whole is not None:
            return self.whole[:, y : y + height, x : x + width]
        return _read_region(self.reader, self.wsi, self.level, y, x, height, width)


TISSUE_PIXELS_PER_TILE = 8  # the tissue mask's least resolution: a tile spans this many of its pixels
TISSUE_MAX_PIXELS = 2**26  # the tissue level's most pixels (it is read whole)


def tissue_level(reader, wsi, level: int, tile: int) -> int:
    """The level the tissue mask and the thumbnail come from: the lowest resolution on which a tile
    of ``level`` still spans ``TISSUE_PIXELS_PER_TILE`` pixels (a pyramid may go down to one tile,
    where small fragments of tissue vanish), at least one level below ``level`` where there is one,
    and no larger than ``TISSUE_MAX_PIXELS`` where a lower level is."""
    count = reader.get_level_count(wsi)
    ratio = reader.get_downsample_ratio(wsi, level)
    chosen = min(level + 1, count - 1)
    for low in range(level + 1, count):
        if tile * ratio / reader.get_downsample_ratio(wsi, low) >= TISSUE_PIXELS_PER_TILE:
            chosen = low
    while chosen < count - 1 and math.prod(reader.get_size(wsi, chosen)) > TISSUE_MAX_PIXELS:
        chosen += 1
    return chosen


def thumbnail_level(reader, wsi, level: int, low: int) -> int:
    """The level the thumbnail is drawn from: the finest from the explained ``level`` down to the
    tissue level ``low`` whose longer side is at most ``THUMBNAIL_SIDE`` (on a small slide the
    evidence would be a few pixels at the tissue level), else ``low`` (shrunk to fit)."""
    for candidate in range(level, low):
        if max(reader.get_size(wsi, candidate)) <= THUMBNAIL_SIDE:
            return candidate
    return low


def tissue_mask(reader, wsi, level: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tissue, rgb, level)``: a boolean tissue mask ``(h, w)`` and the RGB image ``(3, h, w)`` of
    ``level`` (default: the lowest resolution; see :func:`tissue_level`), where tissue is HSV
    saturation above Otsu's threshold (as MONAI's ``MaskedPatchWSIDataset`` does); glass and white
    background are unsaturated."""
    from skimage.filters import threshold_otsu

    level = reader.get_level_count(wsi) - 1 if level is None else level
    height, width = reader.get_size(wsi, level)
    rgb = _read_region(reader, wsi, level, 0, 0, height, width)
    brightest, darkest = rgb.max(axis=0), rgb.min(axis=0)  # HSV saturation (max - min) / max, as rgb2hsv's
    saturation = np.divide(brightest - darkest, brightest, out=np.zeros(brightest.shape, np.float32),
                           where=brightest > 0, dtype=np.float32)
    del brightest, darkest
    if float(saturation.max() - saturation.min()) < 0.05:  # uniform: no tissue/background contrast
        return saturation > 0.5, rgb, level
    return saturation > threshold_otsu(saturation), rgb, level


def tile_grid(
    level_size: tuple[int, int], tile: int, tissue: np.ndarray, scale: float, min_tissue: float = 0.1
) -> list[SlideTile]:
    """The tiles of a level ``(H, W)`` whose footprint on ``tissue`` holds at least ``min_tissue`` tissue.

    Args:
        level_size: ``(H, W)`` of the explained level.
        tile: tile side in level pixels; edge tiles are cut at the level's border.
        tissue: boolean mask of a lower level.
        scale: tissue-mask pixels per level pixel (``< 1``).
        min_tissue: the least tissue fraction for a tile to be explained.
    """
    height, width = level_size
    tiles = []
    for row in range(math.ceil(height / tile)):
        for col in range(math.ceil(width / tile)):
            y, x = row * tile, col * tile
            h, w = min(tile, height - y), min(tile, width - x)
            y0, x0 = int(y * scale), int(x * scale)
            y1, x1 = max(y0 + 1, math.ceil((y + h) * scale)), max(x0 + 1, math.ceil((x + w) * scale))
            fraction = float(tissue[y0:y1, x0:x1].mean()) if tissue[y0:y1, x0:x1].size else 0.0
            if fraction >= min_tissue:
                tiles.append(SlideTile(len(tiles), row, col, y, x, h, w, round(fraction, 4)))
    return tiles


def _pooled(source: np.ndarray, target: np.ndarray, strip: int = 512) -> None:
    """``target`` = 2x2 max-pool of ``source`` (both 2D arrays, memmaps welcome), a strip of rows at a time."""
    for top in range(0, target.shape[0], strip):
        block = np.asarray(source[2 * top : 2 * (top + strip)])
        if block.shape[0] % 2:
            block = np.concatenate([block, np.zeros_like(block[:1])])
        if block.shape[1] % 2:
            block = np.concatenate([block, np.zeros_like(block[:, :1])], axis=1)
        pooled = block.reshape(block.shape[0] // 2, 2, block.shape[1] // 2, 2).max(axis=(1, 3))
        target[top : top + pooled.shape[0]] = pooled


EVIDENCE_OF = "monai_medcam evidence of "  # the first page's ImageDescription, followed by the slide's path


def _check_not_another_slides(slide: Path, evidence: Path) -> None:
    """Refuse to write over ``evidence`` made from another slide of the same name (``a/case.tif`` and
    ``b/case.tif`` into one output folder): its ImageDescription names the slide it came from."""
    import tifffile

    if not evidence.is_file():
        return
    try:
        with tifffile.TiffFile(evidence) as tif:
            description = str(tif.pages[0].description or "")
    except Exception:  # noqa: BLE001 - not ours, or damaged: written over as before
        return
    if description.startswith(EVIDENCE_OF) and description[len(EVIDENCE_OF):] != str(slide.resolve()):
        raise InputError(slide, f"{evidence} holds the evidence of another slide of the same name, "
                                f"{description[len(EVIDENCE_OF):]}; give this slide another output folder "
                                "(or restart=True, --restart, to replace it: the slide was moved).")


def write_pyramid(mask: np.ndarray, path: str | Path, work: str | Path, tile: int = 256, mpp: Sequence[float] | None = None,
                  description: bytes | None = None) -> Path:
    """Write a 2D uint8 mask (a memmap is read a tile at a time) as a tiled pyramidal TIFF.

    Levels are consecutive tiled pages, each half the previous (2x2 max-pool, so small evidence
    stays visible), down to one tile; ``mpp`` (microns per pixel, y and x) of the first level
    becomes the resolution tags (TIFF stores x then y), ``description`` (UTF-8: a path may hold any
    character) the first page's ImageDescription. Lower levels are built as memmaps in ``work``.
    """
    import tifffile

    levels = [mask]
    work = Path(work)
    for k, shape in enumerate(_lower_levels(mask.shape, tile), start=1):
        lower = np.lib.format.open_memmap(work / f"pyramid_{k}.npy", mode="w+", dtype=np.uint8, shape=shape)
        _reserve_disk(work / f"pyramid_{k}.npy", f"level {k} of the evidence pyramid", work)
        _pooled(levels[-1], lower)
        levels.append(lower)

    def tiles(level: np.ndarray) -> Iterator[np.ndarray]:
        for top in range(0, level.shape[0], tile):
            for left in range(0, level.shape[1], tile):
                out = np.zeros((tile, tile), np.uint8)
                part = np.asarray(level[top : top + tile, left : left + tile])
                out[: part.shape[0], : part.shape[1]] = part
                yield out

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=mask.size > 2**31) as tif:
        for k, level in enumerate(levels):
            extra = {"description": description} if description and not k else {}
            if mpp is not None:
                extra.update({"resolution": (1e4 / (mpp[1] * 2**k), 1e4 / (mpp[0] * 2**k)), "resolutionunit": "CENTIMETER"})
            tif.write(
                tiles(level), shape=level.shape, dtype=np.uint8, tile=(tile, tile), photometric="minisblack",
                compression="zlib", subfiletype=1 if k else 0, metadata=None, **extra,
            )
    return Path(path)


THUMBNAIL_SIDE = 2048  # the thumbnail's longest side at most (the tissue level of a large slide can be larger)
EVIDENCE_TINT, TILE_BLUE, UNVERIFIED_YELLOW = (255, 0, 0), (40, 90, 200), (255, 210, 0)
THUMBNAIL_BLOCK_BYTES = 2**26  # the level's mask is pooled into the thumbnail in blocks of about this size
LEGEND_WIDTH = 300  # the thumbnail's caption and key wrap to the picture's width, at least this


def _caption(level: int, tile: int, rows: Sequence[dict], class_names: dict[int, str] | None = None,
             class_idx: int | None = None) -> str:
    """What the thumbnail shows, in words: ``"level 2, 64 px tiles; 12 tissue tiles: 9 no lesion, 3
    lesion"`` (the most called first) from the tiles' CSV rows (their ``label``; ``class_names`` name the
    classes), or ``"...; 12 tissue tiles, lesion explained on each"`` where ``class_idx`` was asked for."""
    if class_idx is not None:  # every row's label is the class asked for, not the classifier's call
        return f"level {level}, {tile} px tiles; {len(rows)} tissue tiles, {class_text(class_idx, class_names)} explained on each"
    counts = Counter(int(row["label"]) for row in rows)
    calls = ", ".join(f"{n} {class_text(k, class_names)}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"level {level}, {tile} px tiles; {len(rows)} tissue tiles" + (f": {calls}" if calls else "")


def _with_legend(image, caption: str, unverified: int):
    """``image`` (PIL) above a white strip holding ``caption`` and the key to its colours, each
    wrapped to the image's width (at least ``LEGEND_WIDTH``: a narrower image gets a white margin on
    its right); the image keeps its pixels at the top left."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or without FreeType: the bitmap font, one size
        font = ImageFont.load_default()
    tint = tuple(int(0.45 * 255 + 0.55 * c) for c in EVIDENCE_TINT)  # the evidence's tint on white
    keys = [("evidence", tint, 0), ("tile explained", TILE_BLUE, 1),
            (f"evidence NOT verified: {unverified} tile{'' if unverified == 1 else 's'}", UNVERIFIED_YELLOW, 2)]
    line, pad, box, gap = 16, 6, 10, 14
    lines = _wrap(caption, font, max(image.width, LEGEND_WIDTH) - 2 * pad)
    width = max(image.width, LEGEND_WIDTH, *(int(font.getlength(text)) + 2 * pad for text in lines))
    placed, left, row = [], pad, 0  # the keys flow left to right, wrapping to the width
    for text, colour, outline in keys:
        w = box + 4 + font.getlength(text)
        if left > pad and left + w > width - pad:
            left, row = pad, row + 1
        placed.append((left, row, text, colour, outline))
        left += w + gap
    framed = Image.new("RGB", (width, image.height + (len(lines) + row + 1) * line + 2 * pad), "white")
    framed.paste(image, (0, 0))
    draw = ImageDraw.Draw(framed)
    for k, text in enumerate(lines):
        draw.text((pad, image.height + pad + k * line), text, fill="black", font=font)
    for left, row, text, colour, outline in placed:
        top = image.height + pad + (len(lines) + row) * line
        square = [left, top + 2, left + box, top + 2 + box]
        draw.rectangle(square, fill=None if outline else colour, outline=colour if outline else None, width=outline or 1)
        draw.text((left + box + 4, top), text, fill="black", font=font)
    return framed


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` where it can be, broken after its commas."""
    lines: list[str] = []
    for piece in text.split(", "):
        if lines and font.getlength(f"{lines[-1]}, {piece}") <= width:
            lines[-1] = f"{lines[-1]}, {piece}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(piece)
    return lines if text else []


def _thumbnail(rgb: np.ndarray, mask: np.ndarray, scale: float, path: Path, tiles: Sequence[SlideTile], tile: int,
               unverified: set[int] = frozenset(), caption: str = "") -> Path:
    """The tissue level ``(3, h, w)`` (``scale``: its pixels per pixel of the explained level), shrunk
    to at most ``THUMBNAIL_SIDE``, with the evidence tinted red and the explained tiles outlined: blue,
    or a thicker yellow for the tiles (indices in ``unverified``) whose evidence was not verified.
    Below it, ``caption`` (:func:`_caption`) and the colours' key; the picture's top left ``(h, w)``
    is the tissue level's (shrunk)."""
    from PIL import Image, ImageDraw

    shrink = math.ceil(max(rgb.shape[1:]) / THUMBNAIL_SIDE)
    if shrink > 1:
        size = (max(1, rgb.shape[2] // shrink), max(1, rgb.shape[1] // shrink))
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).resize(size, Image.BOX)).transpose(2, 0, 1)
        scale = scale / shrink
    height, width = rgb.shape[1:]
    factor = max(1, int(round(1 / scale)))
    small = np.zeros((math.ceil(mask.shape[0] / factor), math.ceil(mask.shape[1] / factor)), np.uint8)
    step = max(1, THUMBNAIL_BLOCK_BYTES // (factor * factor * max(1, small.shape[1])))  # thumbnail rows per block
    for top in range(0, small.shape[0], step):  # max-pool the level's mask to about the thumbnail's size
        block = np.asarray(mask[top * factor : (top + step) * factor])
        pad = (-block.shape[0] % factor, -block.shape[1] % factor)
        block = np.pad(block, ((0, pad[0]), (0, pad[1])))
        small[top : top + block.shape[0] // factor] = block.reshape(block.shape[0] // factor, factor, -1, factor).max(axis=(1, 3))
    evidence = np.asarray(Image.fromarray(small).resize((width, height), Image.NEAREST)) > 0
    picture = rgb.transpose(1, 2, 0).astype(np.float32)
    picture[evidence] = 0.45 * picture[evidence] + 0.55 * np.array(EVIDENCE_TINT, np.float32)
    image = Image.fromarray(picture.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for t in sorted(tiles, key=lambda t: t.index in unverified):  # the yellow outlines drawn last, on top
        x0, y0 = int(t.x * scale), int(t.y * scale)  # an edge tile thinner than a thumbnail pixel: one pixel wide
        box = [x0, y0, max(x0, math.ceil((t.x + t.width) * scale) - 1), max(y0, math.ceil((t.y + t.height) * scale) - 1)]
        if t.index in unverified:
            draw.rectangle(box, outline=UNVERIFIED_YELLOW, width=2)
        else:
            draw.rectangle(box, outline=TILE_BLUE)
    image = _with_legend(image, caption, len(unverified))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _read_journal(path: Path) -> dict[int, list[dict[str, object]]]:
    """Finished batches -> their rows. A torn last line (a run killed while writing it) is cut off
    the file, so that the next entries start on a line of their own."""
    done: dict[int, list[dict[str, object]]] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    good = 0
    for line in data.splitlines(keepends=True):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if not line.endswith(b"\n"):
            break
        done[int(entry["batch"])] = entry["rows"]
        good += len(line)
    if good < len(data):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return done


def _level_mpp(reader, wsi, level: int, ratio: float) -> list[float] | None:
    """Microns per pixel ``(y, x)`` of ``level``: its own, else level 0's times ``ratio`` (converters
    that tag level 0 alone); ``None`` where the slide gives none that is positive and finite."""
    for source, factor in ((level, 1.0), (0, ratio)):
        try:
            mpp = [float(v) * factor for v in reader.get_mpp(wsi, source)]
        except Exception:  # noqa: BLE001 - slides without a physical resolution raise their own kinds
            continue
        if len(mpp) == 2 and all(math.isfinite(v) and v > 0 for v in mpp):
            return mpp
    return None


@contextmanager
def _only_run(output: Path, name: str, slide: Path) -> Iterator[None]:
    """Hold ``output/.<name>.medcam.lock`` (:func:`~monai_medcam.writers.only_writer`) while a run
    writes the slide's state and outputs: a second run on them is refused, not left to interleave
    its journal and remove the state under the first. Holding it, the temporary files of an earlier
    run killed during its final writes are removed (where the lock could be taken)."""
    try:
        with only_writer(output / f".{name}.medcam.lock") as held:
            if held:  # unlocked, a run cannot know whether another is writing them
                remove_temporaries(output, {f"{name}_{kind}" for kind in ("evidence.tif", "tiles.csv", "thumbnail.png")})
            yield
    except OutputsLocked as err:  # only the lock's own refusal: the block raises no such error
        raise InputError(slide, f"another run is writing this slide's outputs in {output} (it holds {err.lock}); "
                                "wait for it to finish, or give another output folder.") from err


def _removed(state: Path) -> Path:
    """Where :func:`_remove_state` renames a state folder before removing it."""
    return state.with_name(state.name + ".removed")


def _remove_state(state: Path) -> None:
    """Remove a working state folder: renamed first, so that one half removed (a run killed while
    removing it) is not taken for a state to resume."""
    trash = _removed(state)
    shutil.rmtree(trash, ignore_errors=True)
    state.rename(trash)
    shutil.rmtree(trash)


def _file_ends(path: Path, size: int = 2**20) -> str:
    """SHA-256 of a file's first and last ``size`` bytes: which slide a working state belongs to, the
    same for a copy of it elsewhere (a job that copies slides to node-local scratch) and different
    for another slide or one written again (a slide file's header and last tiles differ)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(size))
        handle.seek(max(0, path.stat().st_size - size))
        digest.update(handle.read(size))
    return digest.hexdigest()


def _fingerprint(network: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: a resumed run must use the same classifier."""
    digest = hashlib.sha256()
    for name, value in network.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _slide_name(slide: Path) -> str:
    """``case.1.svs`` -> ``case.1``; ``x.ome.tif`` -> ``x``."""
    name = slide.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return slide.stem or name


def explain_slide(
    classifier: torch.nn.Module,
    slide: str | Path,
    output: str | Path,
    level: int = 0,
    tile: int = 224,
    size: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    class_idx: int | None = None,
    target_layers: str | Sequence[str] = "auto",
    min_tissue: float = 0.1,
    backend: str = "auto",
    restart: bool = False,
    progress: bool = True,
    class_names: str | Sequence[str] | dict | None = None,
    provenance: Mapping[str, object] | None = None,
    **settings: object,
) -> WSIReport:
    """Explain every tissue tile of ``slide`` at ``level`` and write the slide-level evidence.

    Args:
        classifier: the frozen tile classifier ``(B, 3, T, T)`` RGB in [0, 1] -> logits.
        slide: a pyramidal whole-slide image (openslide formats, or TIFF with the levels as pages).
        output: folder for ``<slide>_evidence.tif`` (pyramidal, 255 = evidence), ``<slide>_tiles.csv``
            and ``<slide>_thumbnail.png``.
        level: the pyramid level the tiles are cut from (0 = full resolution).
        tile: tile side in pixels of ``level``.
        size: the classifier's input side when it differs from ``tile`` (tiles are resized, masks resized back).
        batch_size: tiles optimised together.
        device: where Med-CAM runs.
        class_idx: the class to explain; each tile's prediction when ``None``.
        target_layers: as for :class:`~monai_medcam.MedCAM`.
        min_tissue: the least tissue fraction of a tile's footprint for it to be explained.
        backend: ``"auto"``, ``"openslide"`` or ``"tifffile"``.
        restart: discard the working state of an earlier, different run instead of refusing.
        progress: show a progress bar (tiles, tiles/s, ETA).
        class_names: the classes' names, in class order (``("no lesion", "lesion")``) or by index
            (a bundle's ``channel_def``): the thumbnail's caption counts the tiles' calls by name.
        provenance: where given (``command``, ``classifier``: :func:`~monai_medcam.provenance.command_context`),
            ``<slide>_run.json`` is written with the other outputs: the run's record
            (:mod:`monai_medcam.provenance`), its outcome the tiles' counts.
        settings: any :class:`~monai_medcam.MedCAMSettings` field (``steps``, ``seed``, ...).

    Tiles whose decision needs no evidence (``vacuous``, e.g. the classifier says "normal" for an
    empty image) are not optimised (``skip_vacuous=True`` unless given) and add nothing to the slide
    map; the CSV still lists them. With the tifffile backend the explained level is decoded into
    memory once (MONAI's tifffile reader cannot read windows); openslide reads tile by tile.

    Raises:
        InputError: unreadable or non-pyramidal slide, level out of range, tile larger than the
            level, no tissue, or working state from a different run. Nothing is written then.
        ValueError: bad settings, or a classifier that does not take RGB tiles ``(1, 3, size, size)``
            or has no class ``class_idx`` (one forward pass of zeros). Nothing is written then.
        OSError: not enough disk space in ``output`` for the slide map (``level``'s size, one byte a
            pixel) and the evidence pyramid's lower levels (a third of that); checked, and the map's
            blocks reserved, before any tile is explained.
    """
    start = time.perf_counter()
    if not is_whole_number(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, not {batch_size!r}.")
    batch_size = int(batch_size)
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise ValueError(f"min_tissue is a fraction of a tile, from 0 to 1, not {min_tissue!r}.")
    settings.setdefault("skip_vacuous", True)
    class_names = class_names_map(class_names)
    restart = as_bool("restart", restart)  # a bundle's command line gives "false" as a string
    slide = Path(slide)
    reader, wsi = open_slide(slide, backend)
    count = reader.get_level_count(wsi)
    if not 0 <= level < count:
        raise InputError(slide, f"level {level} is out of range: the slide has levels 0 to {count - 1}.")
    level_size = tuple(int(v) for v in reader.get_size(wsi, level))
    if tile < 8:
        raise InputError(slide, f"tile {tile} is too small: at least 8 pixels.")
    if tile > min(level_size):
        raise InputError(slide, f"tile {tile} is larger than level {level} ({level_size[1]} x {level_size[0]} pixels).")
    name = _slide_name(slide)
    if not restart:
        _check_not_another_slides(slide, Path(output) / f"{name}_evidence.tif")
    low = tissue_level(reader, wsi, level, tile)
    try:
        read = _LevelReader(reader, wsi, level, slide)  # first: with tifffile it refuses levels too large to decode
        tissue, thumb_rgb, low = tissue_mask(reader, wsi, low)
    except InputError:
        raise
    except Exception as err:  # a slide that opens but whose pixels the backend cannot give as RGB
        passed = "; ".join(getattr(reader, "medcam_refusals", []))
        raise InputError(slide, f"cannot read the slide's pixels with {getattr(reader, 'backend', backend)} "
                                f"({type(err).__name__}: {err})" + (f"; the other reader refused it: {passed}" if passed
                                                                     else "; try the other --backend") + ".") from err
    level_ratio = reader.get_downsample_ratio(wsi, level)  # level-0 pixels per pixel of the level
    scale = level_ratio / reader.get_downsample_ratio(wsi, low)
    tiles = tile_grid(level_size, tile, tissue, scale, min_tissue)
    if not tiles:
        grey = float(np.ptp(thumb_rgb.astype(np.int16), axis=0).max()) < 8  # no colour anywhere
        hint = ("; a grey or fluorescence slide has no colour to find tissue by: min_tissue=0 (--min-tissue 0) "
                "explains every tile") if grey else ""
        raise InputError(slide, f"no tissue found (no tile at level {level} has {min_tissue:.0%} tissue){hint}; nothing to explain.")
    explainer = MedCAM(classifier, target_layers, **settings)  # bad settings or layers fail before anything is written
    device = torch.device(device)
    classifier.to(device).eval()  # in place: the explainer's classifier
    # a classifier that does not take RGB tiles of this size, or a class it does not have, fails here too
    check_classifier(explainer, 2, 3, (size or tile,), class_idx, device, options="--tile and --size",
                     class_names=list(class_names))
    # the settings as resolved (defaults included), so a run resumed after a default changed is a different run
    resolved = asdict(explainer.resolved_settings(2))

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(slide, f"the output {output} is a file, not a folder.")
    output.mkdir(parents=True, exist_ok=True)
    background = _background_colour(thumb_rgb)
    run = {
        "slide_bytes": slide.stat().st_size, "slide_ends": _file_ends(slide),  # not its path: a copy (node scratch) resumes
        "backend": getattr(reader, "backend", backend), "device": str(torch.device(device)), "level": level,
        "tile": tile, "size": size, "batch_size": batch_size, "class_idx": class_idx, "min_tissue": min_tissue,
        "tiles": len(tiles), "tissue_level": low, "target_layers": target_layers if isinstance(target_layers, str) else [str(t) for t in target_layers],
        "settings": {k: resolved[k] for k in sorted(resolved) if k != "progress"}, "classifier": _fingerprint(classifier),
        "edge_padding": background.tolist(),  # a state from a version that padded with white is not resumed
    }
    run = json.loads(json.dumps(run, default=str))
    record = None if provenance is None else run_record(explainer, 2, device, settings, **provenance)
    with _only_run(output, name, slide):  # one run at a time on these outputs (a requeued job array, say)
        state = _working_state(output / f".{name}.medcam", run, level_size, slide, restart)
        mask = np.lib.format.open_memmap(state / "mask.npy", mode="r+")
        batches = [tiles[k : k + batch_size] for k in range(0, len(tiles), batch_size)]
        done = _read_journal(state / "journal.jsonl")
        resumed = sum(len(batches[k]) for k in done)
        if done:
            logger.info("%s: resuming, %d of %d tiles already explained", slide.name, resumed, len(tiles))
        bar = tqdm(total=len(tiles), initial=resumed, unit="tile", desc=f"Med-CAM {slide.name}", disable=not progress)
        # the explainer's notes per batch (vacuous tiles, unsettled masks) would be thousands of lines
        # on a slide: one summary after, from the rows; its warnings stay
        engine_log = logging.getLogger("monai_medcam.engine")
        held = _EngineNotesHeld() if engine_log.level == logging.NOTSET and engine_log.getEffectiveLevel() == logging.INFO else None
        if held:  # not where the caller set the engine's level, or asked for debug output
            engine_log.addFilter(held)
        try:
            with (state / "journal.jsonl").open("a") as journal:
                for k, batch in enumerate(batches):
                    if k not in done:
                        done[k] = _explain_batch(explainer, read, batch, mask, tile=tile, size=size, class_idx=class_idx,
                                                 device=device, background=background, level_ratio=level_ratio, slide=slide, level=level)
                        _record(journal, k, done[k])
                        bar.update(len(batch))
        finally:
            engine_log.removeFilter(held)
            bar.close()

        outputs = {
            "evidence": output / f"{name}_evidence.tif",
            "tiles": output / f"{name}_tiles.csv",
            "thumbnail": output / f"{name}_thumbnail.png",
        }
        record_path = output / f"{name}_{RUN_RECORD}"
        if record is not None:
            outputs["run"] = record_path
        mpp = _level_mpp(reader, wsi, level, level_ratio)
        remove_run_record(record_path)  # an earlier run's, beside this run's evidence, would mislead
        write_pyramid(mask, outputs["evidence"], state, mpp=mpp, description=(EVIDENCE_OF + str(slide.resolve())).encode())
        rows = [row for k in range(len(batches)) for row in done[k]]  # in grid order
        with atomic_path(outputs["tiles"]) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(TILE_FIELDS))
            writer.writeheader()
            writer.writerows(rows)
        unverified = {int(row["tile"]) for row in rows if evidence_not_verified(row)}  # not the vacuous tiles left empty
        vacuous = sum(bool(summary_flag(row["vacuous"])) for row in rows)
        unsettled = sum(summary_flag(row["settled"]) is False for row in rows)
        logger.info("%s: %d tiles explained: %d need no evidence (vacuous), %d ran out of steps unsettled, %d not verified",
                    slide.name, len(rows), vacuous, unsettled, len(unverified))
        view = thumbnail_level(reader, wsi, level, low)  # finer than the tissue level where it fits
        view_rgb = thumb_rgb if view == low else _read_region(reader, wsi, view, 0, 0, *reader.get_size(wsi, view))
        _thumbnail(view_rgb, mask, level_ratio / reader.get_downsample_ratio(wsi, view), outputs["thumbnail"], tiles, tile,
                   unverified, caption=_caption(level, tile, rows, class_names, class_idx))
        if record is not None:
            write_run_record(record_path, record, "finished", slide=str(slide.resolve()), level=level, tiles=len(rows),
                             explained_now=len(tiles) - resumed, resumed=resumed, vacuous=vacuous, unsettled=unsettled,
                             not_verified=len(unverified))
        del mask
        _remove_state(state)
    return WSIReport(slide, level, level_size, len(tiles), len(tiles) - resumed, resumed, outputs, time.perf_counter() - start)


class _EngineNotesHeld(logging.Filter):
    """Drops the explainer's notes below WARNING logged by this thread (its tiles), not another's."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.thread != self.thread


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """``"settings.steps: 150 -> 100"`` for each key whose value differs between two runs' arguments."""
    found = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            found += _differences(dict(enumerate(a)), dict(enumerate(b)), f"{prefix}{key}")
        elif a != b:
            name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}{key}"
            found.append(f"{name}: {_short(a)} -> {_short(b)}")
    return found


_ABSENT = object()


def _short(value: object) -> str:
    """A value for a message: its start and end where it is long (names that differ at the end show)."""
    text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 40 else f"{text[:14]}...{text[-23:]}"


def _working_state(state: Path, run: dict, level_size: tuple[int, int], slide: Path, restart: bool) -> Path:
    """The folder ``state`` holding this run's slide map ``mask.npy`` (``level_size``, uint8, on disk),
    ``run.json`` and the journal of explained batches: an earlier run's to resume where ``run`` is
    the same, else a new one (an earlier, different or damaged one discarded with ``restart``,
    refused without)."""
    shutil.rmtree(_removed(state), ignore_errors=True)  # what a killed removal left
    if state.exists():
        try:
            previous = json.loads((state / "run.json").read_text())
        except (OSError, ValueError):  # missing or torn (a power cut while it was written): not this run's
            previous = None
        if previous != run or not (state / "mask.npy").is_file():
            if not restart:
                differ = _differences(previous, run) if isinstance(previous, dict) and previous != run else []
                what = (f"of a different run ({'; '.join(differ[:6])}{'; ...' if len(differ) > 6 else ''}): the earlier "
                        "arguments, slide and classifier, under the same version of monai_medcam, resume it; or" if differ else
                        "of a different run (other arguments or slide, or an earlier version of monai_medcam) or a damaged one:")
                raise InputError(slide, f"{state} holds the state {what} restart (--restart, restart=True) to discard it.")
            _remove_state(state)
    new = not state.exists()
    staging = state.with_name(state.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # what a run killed while making its state left
    for left in state.glob("pyramid_*.npy"):  # what a run killed while writing its pyramid left
        left.unlink()
    unreserved = level_size[0] * level_size[1]
    if not new:  # blocks of the map not yet on disk (a sparse map of an earlier version)
        held = (state / "mask.npy").stat()
        unreserved = max(0, held.st_size - getattr(held, "st_blocks", held.st_size // 512) * 512)
    need = _pyramid_bytes(level_size) + unreserved
    free = shutil.disk_usage(state.parent).free
    if free < need:  # the slide map now, the lower levels of the evidence pyramid once every tile is explained
        raise OSError(errno.ENOSPC, f"not enough disk space in {state.parent} for the slide map and evidence pyramid "
                                    f"of {slide} ({_gb(need)} needed, {_gb(free)} free); free some space or give "
                                    "another output folder")
    if new:
        staging.mkdir()
        try:
            np.lib.format.open_memmap(staging / "mask.npy", mode="w+", dtype=np.uint8, shape=level_size).flush()
            _reserve_disk(staging / "mask.npy", f"the slide map of {slide}", state.parent)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk leaves no state behind
            raise
        (staging / "run.json").write_text(json.dumps(run, indent=1))
        staging.rename(state)  # the state appears whole or not at all
    else:
        _reserve_disk(state / "mask.npy", f"the slide map of {slide}", state.parent)  # an earlier version's may be sparse
    return state


def _reserve_disk(path: Path, what: str, folder: Path) -> None:
    """Allocate every block of ``path`` (a memmap's file) on disk now. A memmap's file is sparse: a
    page first written when the disk is full kills the process with SIGBUS, hours into a slide and
    with no message; reserved, a full disk is an ``OSError`` naming ``what`` and ``folder`` (the
    one to free or change) before the work. Where allocation is not supported, the file stays sparse."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    size = path.stat().st_size
    with path.open("r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # some NFS, ZFS and FUSE mounts
                logger.debug("%s: cannot reserve its blocks (%s); left sparse", path, err)
                return
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OSError(err.errno, f"not enough disk space in {folder} for {what} ({_gb(size)}, "
                                     f"{_gb(shutil.disk_usage(path.parent).free)} free); free some space or give "
                                     "another output folder") from err


def _lower_levels(shape: tuple[int, int], tile: int = 256) -> list[tuple[int, int]]:
    """The shapes of the pyramid's levels below one of ``shape``: each half the one above (rounded
    up), down to the first that fits in one ``tile``."""
    shapes = []
    while max(shape) > tile:
        shape = ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
        shapes.append(shape)
    return shapes


def _pyramid_bytes(shape: tuple[int, int], tile: int = 256) -> int:
    """Bytes of the lower levels :func:`write_pyramid` builds as memmaps for a mask of ``shape``."""
    return sum(rows * columns for rows, columns in _lower_levels(shape, tile))


def _gb(size: int) -> str:
    """``size`` bytes in GB, MB or kB: ``"12.35 GB"``, ``"0.3 MB"``."""
    if size >= 10**9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 10**5 else f"{size / 1e3:.1f} kB"


def _background_colour(rgb: np.ndarray) -> np.ndarray:
    """The slide's background ``(3,)`` uint8, what edge tiles are padded with: the median colour of
    the thumbnail ``rgb`` ``(3, h, w)`` along its border (a band of 2% of its side, at least a pixel),
    where a scan shows glass on a brightfield slide and black on a fluorescence one, and where the
    padding continues the slide. Not the tissue mask's outside: on a grey or dark slide that mask
    is empty or noise."""
    band = max(1, min(rgb.shape[1:]) // 50)
    border = np.concatenate([rgb[:, :band].reshape(3, -1), rgb[:, -band:].reshape(3, -1),
                             rgb[:, band:-band, :band].reshape(3, -1), rgb[:, band:-band, -band:].reshape(3, -1)], axis=1)
    return np.median(border, axis=1).astype(np.uint8)


def _explain_batch(explainer: MedCAM, read: _LevelReader, batch: Sequence[SlideTile], mask: np.ndarray, *, tile: int,
                   size: int | None, class_idx: int | None, device: torch.device, background: np.ndarray,
                   level_ratio: float, slide: Path, level: int) -> list[dict[str, object]]:
    """Explain one batch of tiles of ``level``, write their masks into the slide map ``mask`` (flushed
    to disk) and return their rows. Edge tiles are padded with ``background``; masks of vacuous
    tiles are left out where ``skip_vacuous``."""
    pixels = np.empty((len(batch), 3, tile, tile), np.uint8)
    pixels[:] = background[None, :, None, None]
    for j, t in enumerate(batch):
        try:
            pixels[j, :, : t.height, : t.width] = read(t.y, t.x, t.height, t.width)
        except Exception as err:  # a damaged tile in an otherwise readable slide
            raise InputError(slide, f"cannot read tile {t.index} (row {t.row}, column {t.col}) at level {level}: "
                             f"{type(err).__name__}: {err}") from err
    x = torch.from_numpy(pixels).float().div_(255).to(device)
    if size is not None and size != tile:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    try:
        result = explainer.explain(x, class_idx, names=[f"tile {t.index}" for t in batch])
    except ValueError as err:  # e.g. a class index the classifier does not have
        raise InputError(slide, f"cannot explain tiles {batch[0].index}-{batch[-1].index}: {err}") from err
    masks = result.mask.as_tensor().detach().float()
    if masks.shape[-1] != tile:
        masks = F.interpolate(masks, size=(tile, tile), mode="nearest-exact")
    masks = masks.cpu().numpy()
    rows = []
    for j, (t, diagnostics) in enumerate(zip(batch, result.summary())):
        keep = 0 if diagnostics["vacuous"] and explainer.settings.skip_vacuous else EVIDENCE_VALUE
        mask[t.y : t.y + t.height, t.x : t.x + t.width] = (masks[j, 0, : t.height, : t.width] > 0.5) * keep
        row = {**asdict(t), "x0": int(round(t.x * level_ratio)), "y0": int(round(t.y * level_ratio))}
        row.update({f: diagnostics[f] for f in TILE_FIELDS if f in diagnostics})
        row["tile"] = row.pop("index")
        rows.append(row)
    mask.flush()  # the tile masks are on disk before the journal says the batch is done
    return rows


def _record(journal, k: int, rows: list[dict[str, object]]) -> None:
    """Batch ``k`` done, with its rows: a line of the journal, on disk before the next batch starts."""
    journal.write(json.dumps({"batch": k, "rows": rows}) + "\n")
    journal.flush()
    os.fsync(journal.fileno())
