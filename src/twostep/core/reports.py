"""Images and documents people look at: sample grids, and the command-written sections of results.md."""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import torch

from twostep.core.errors import TwostepError
from twostep.core.utils import atomic_path, check_output_file, read_text_file, write_text


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, ncols: int, scale: int = 4, pad: int = 2,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None):
    """A PIL image of ``images`` laid out row-major, each upscaled ``scale``x (nearest) for 8x8 digits."""
    from PIL import Image, ImageDraw

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrows = (n + ncols - 1) // ncols
    cell_h, cell_w = h * scale + pad, w * scale + pad
    left = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    top = 0 if not col_labels else 16
    canvas = Image.new("RGB", (left + ncols * cell_w + pad, top + nrows * cell_h + pad), (255, 255, 255))
    for i in range(n):
        tile = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i]).convert("RGB")
        tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        r, col = divmod(i, ncols)
        canvas.paste(tile, (left + pad + col * cell_w, top + pad + r * cell_h))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + pad + r * cell_h + cell_h // 2 - 6), text, fill=(0, 0, 0))
    for col, text in enumerate(col_labels or []):
        draw.text((left + pad + col * cell_w + 2, 2), text, fill=(0, 0, 0))
    return canvas


def image_format(path: str) -> str:
    """The PIL format for ``path``'s extension (PNG without one); an extension PIL cannot write is an error."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return "PNG"
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise TwostepError(f"cannot write an image named {path!r}: unknown image extension {ext!r}; use .png, .jpg "
                           "or .webp")
    return fmt


def save_image(image, path: str) -> None:
    """Save a PIL image atomically (format from the extension)."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def check_markdown_target(path: str) -> str:
    """Before any work: ``path`` can be written, and if it exists it is readable UTF-8 text (sections go into it)."""
    check_output_file(path, what="markdown file")
    if os.path.isfile(path):
        read_text_file(path, what="markdown file")
    return path


def update_section(path: str, name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- twostep:NAME:begin -->`` and ``...:end -->`` in ``path``.

    Only these blocks are written by commands; everything around them is left as it is.
    """
    begin, end = f"<!-- twostep:{name}:begin -->", f"<!-- twostep:{name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = read_text_file(path, what="markdown file") if os.path.isfile(path) else "# Results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)
