"""What the model retrieved: `retrieval_<split>.png` (a grid of N queries) and `retrieval_<split>.html`
(every query) in a stage folder.

PNG layout (exact, see `grid_size`): one row per query, each row `cell` = tile + 2*pad pixels high;
columns = reference tile | modification text (`text_width` px) | top-k gallery tiles. The target is
outlined green wherever it appears in the top-k (the reference is outlined grey); each result tile
carries its rank (and score when known) in its corner; a small copy of the target sits in the
bottom-right corner of the text column, so a miss shows what should have been found.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cirlab.io import write_atomic, write_text

log = logging.getLogger("cirlab")

GREEN = (0, 170, 0)
GREY = (150, 150, 150)
TEXT_WIDTH = 200


@dataclass
class QueryView:
    """One query as displayed: names are gallery image names, `path` maps a name to its file."""

    qid: str
    reference: str
    text: str
    targets: tuple[str, ...]
    ranked: list[str]  # top-k gallery names, best first
    scores: list[float] | None = None  # similarity of each ranked name (None: unknown)


def grid_size(n: int, k: int, tile: int = 96, pad: int = 4, text_width: int = TEXT_WIDTH) -> tuple[int, int]:
    """(width, height) of the PNG for n queries and top-k results."""
    cell = tile + 2 * pad
    return text_width + (k + 1) * cell, n * cell


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _thumb(path: Path, tile: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except OSError:
        return Image.new("RGB", (tile, tile), (255, 0, 255))
    img.thumbnail((tile, tile), Image.NEAREST if max(img.size) < tile else Image.BICUBIC)
    if img.size != (tile, tile):  # upscale small images (the synthetic ones are 32 px), keep aspect
        scale = tile / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    canvas = Image.new("RGB", (tile, tile), (255, 255, 255))
    canvas.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return canvas


def render_grid(
    views: Sequence[QueryView],
    path_of: Callable[[str], Path],
    k: int,
    tile: int = 96,
    pad: int = 4,
    text_width: int = TEXT_WIDTH,
) -> Image.Image:
    width, height = grid_size(len(views), k, tile, pad, text_width)
    cell = tile + 2 * pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font, small = _font(13), _font(11)
    cache: dict[str, Image.Image] = {}

    def tile_of(name: str) -> Image.Image:
        if name not in cache:
            cache[name] = _thumb(path_of(name), tile)
        return cache[name]

    def put(name: str, x: int, y: int, outline, label: str | None = None) -> None:
        grid.paste(tile_of(name), (x + pad, y + pad))
        if outline is not None:
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=outline, width=pad - 1 or 1)
        if label:
            box = draw.textbbox((0, 0), label, font=small)
            draw.rectangle(
                [x + pad, y + pad, x + pad + box[2] + 3, y + pad + box[3] + 2], fill=(255, 255, 255)
            )
            draw.text((x + pad + 2, y + pad + 1), label, fill=(0, 0, 0), font=small)

    chars = max(8, (text_width - 10) // 7)
    for row, v in enumerate(views):
        y = row * cell
        if row:
            draw.line([0, y, width, y], fill=(220, 220, 220))
        put(v.reference, 0, y, GREY, "ref")
        lines = textwrap.wrap(v.text, chars)
        max_lines = max(1, (cell - 8) // 15)
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [lines[max_lines - 1][: chars - 3] + "..."]
        hit = next((i + 1 for i, n in enumerate(v.ranked) if n in v.targets), None)
        status = f"target at rank {hit}" if hit else (f"target not in top {k}" if v.targets else "no answer")
        draw.multiline_text((cell + 5, y + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        draw.text((cell + 5, y + cell - 17), status, fill=GREEN if hit else (200, 0, 0), font=small)
        if v.targets:  # a small copy of the (first) target in the text column's corner
            mini = max(16, min(tile // 2, cell - 70))
            tx, ty = cell + text_width - mini - 4, y + cell - mini - 4
            grid.paste(_thumb(path_of(v.targets[0]), mini), (tx, ty))
            draw.rectangle([tx - 2, ty - 2, tx + mini + 1, ty + mini + 1], outline=GREEN, width=2)
            draw.text((tx - 40, ty + mini // 2 - 6), "target", fill=GREEN, font=small)
        for i, name in enumerate(v.ranked[:k]):
            x = cell + text_width + i * cell
            score = f": {v.scores[i]:.2f}" if v.scores is not None else ""
            put(name, x, y, GREEN if name in v.targets else None, f"#{i + 1}{score}")
    return grid


def data_uri(path: Path, size: int = 96) -> str:
    """The image at most `size` px (small images stay small: the page scales them up). A PNG or JPEG
    already that small goes in as its own bytes: re-encoding the ~1,800 thumbnails of a synthetic split
    took 1.1 of the 1.4 s its page cost, once per split and stage of every run."""
    try:
        with Image.open(path) as img:
            if img.format in ("PNG", "JPEG") and max(img.size) <= size:
                mime = img.get_format_mimetype()
                return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()
            img = img.convert("RGB")
    except OSError:
        img = Image.new("RGB", (8, 8), (255, 0, 255))
    img.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    if max(img.size) <= 48:
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }} td {{ border-bottom: 1px solid #ddd; padding: 4px; vertical-align: top; }}
.row {{ display: flex; gap: 6px; align-items: flex-start; }}
figure {{ margin: 0; text-align: center; font-size: 11px; border: 3px solid transparent; }}
figure img {{ width: {size}px; height: {size}px; object-fit: contain; image-rendering: pixelated; display: block; }}
figure.ref {{ border-color: #999; }} figure.hit {{ border-color: #0a0; }}
figure.tgt {{ border: 3px dashed #0a0; margin-right: 12px; }}
.text {{ width: 220px; font-size: 13px; }} .ok {{ color: #0a0; }} .miss {{ color: #c00; }}
.qid {{ font-size: 11px; color: #666; }}
</style></head><body>
<h2>{title}</h2>
<p>{summary}. <label><input type="checkbox" id="miss"> only queries whose target is not in the top-k</label></p>
<table>
{rows}
</table>
<script>
document.getElementById('miss').addEventListener('change', e => {{
  document.querySelectorAll('tr[data-hit]').forEach(tr => {{
    tr.style.display = e.target.checked && tr.dataset.hit === '1' ? 'none' : '';
  }});
}});
</script>
</body></html>
"""


def render_html(
    views: Sequence[QueryView], path_of: Callable[[str], Path], title: str, size: int = 96
) -> str:
    """A self-contained page (thumbnails embedded as base64): every query, its top-k, scores, target."""
    uris: dict[str, str] = {}

    def img(name: str, cls: str, caption: str) -> str:
        if name not in uris:
            uris[name] = data_uri(path_of(name), size)
        return (
            f'<figure class="{cls}"><img src="{uris[name]}" alt="{html.escape(name)}" title="{html.escape(name)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    rows = []
    hits = 0
    for v in views:
        hit = next((i + 1 for i, n in enumerate(v.ranked) if n in v.targets), None)
        hits += hit is not None
        cells = [img(v.reference, "ref", "reference")]
        cells.append(
            f'<div class="text"><b>{html.escape(v.text)}</b><br><span class="{"ok" if hit else "miss"}">'
            + (
                f"target at rank {hit}"
                if hit
                else (
                    f"target {html.escape(', '.join(v.targets))} not in top {len(v.ranked)}"
                    if v.targets
                    else "no public answer"
                )
            )
            + "</span></div>"
        )
        if v.targets:
            cells.append(img(v.targets[0], "tgt", "target"))
        for i, name in enumerate(v.ranked):
            score = f" &middot; {v.scores[i]:.3f}" if v.scores is not None else ""
            mark = " &#10003; target" if name in v.targets else ""
            cells.append(img(name, "hit" if name in v.targets else "res", f"#{i + 1}{score}{mark}"))
        rows.append(
            f'<tr data-hit="{int(hit is not None)}"><td class="qid">{html.escape(v.qid)}</td>'
            f'<td><div class="row">{"".join(cells)}</div></td></tr>'
        )
    summary = f"{len(views)} queries, target in the shown top-k for {hits}"
    return PAGE.format(title=html.escape(title), size=size, summary=summary, rows="\n".join(rows))


def write_visualization(
    folder: Path,
    split: str,
    views: Sequence[QueryView],
    path_of: Callable[[str], Path],
    n: int = 8,
    k: int = 5,
    title: str | None = None,
) -> tuple[Path, Path]:
    """retrieval_<split>.png (first n queries) and retrieval_<split>.html (all queries) in `folder`."""
    folder = Path(folder)
    views = [
        QueryView(
            v.qid, v.reference, v.text, v.targets, v.ranked[:k], None if v.scores is None else v.scores[:k]
        )
        for v in views
    ]
    png = folder / f"retrieval_{split}.png"
    grid = render_grid(views[:n], path_of, k)
    write_atomic(png, lambda tmp: grid.save(tmp, format="PNG"))
    page = folder / f"retrieval_{split}.html"
    write_text(page, render_html(views, path_of, title or f"retrieval on {split}"))
    return png, page


# ---- from an evaluated stage (the pipeline's hook) --------------------------------------------------
def visualize_split(
    module, dm, split: str, folder: Path, n: int = 8, k: int = 5, logger=None
) -> tuple[Path, Path] | None:
    """Write the PNG + HTML of one evaluated split of a stage, ranks and scores as evaluation ranked them
    (`module.results`); log the PNG where the logger takes images (wandb)."""
    results = module.results.get(split)
    if not results:
        return None
    views: list[QueryView] = []
    for es in dm.eval_sets(split):
        res = results[es.group]
        for q in es.queries:
            qid = f"{es.group}/{q.qid}" if es.group else q.qid
            ranked, scores = res.predictions[q.qid][:k], res.scores[q.qid][:k]
            views.append(
                QueryView(qid, q.reference, dm.source.eval_text(q), tuple(q.targets), ranked, scores)
            )
    if not views:
        return None
    png, page = write_visualization(
        folder,
        split,
        views,
        dm.source.image_path,
        n=n,
        k=k,
        title=f"{folder.name}: {split} ({len(views)} queries)",
    )
    if hasattr(logger, "log_image"):  # wandb
        logger.log_image(key=f"retrieval/{split}", images=[str(png)])
    log.info("retrieval visualisation: %s, %s", png, page)
    return png, page
