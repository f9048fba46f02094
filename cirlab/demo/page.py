"""The HTML of the page's text: the results of a search (rank, score, the true target outlined) and the
header saying which run, method and gallery are served."""

from __future__ import annotations

import html
from pathlib import Path

from cirlab.demo.backend import Answer, DemoBackend

CSS = """
#results .row { display: flex; flex-wrap: wrap; gap: 8px; }
#results figure { margin: 0; text-align: center; font-size: 12px; border: 4px solid transparent; padding: 2px; }
#results figure img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; display: block; }
#results figure.hit { border-color: #0a0; }
#results figure.hit figcaption { color: #0a0; font-weight: bold; }
#results ol.captions li.hit { color: #0a0; font-weight: bold; }
#results .summary { margin: 4px 0 8px 0; display: flex; align-items: center; gap: 12px; }
#results figure.tgt { border: 3px dashed #0a0; } #results figure.tgt img { width: 48px; height: 48px; }
#reference img, #grid img { image-rendering: pixelated; }
#reference img { width: 100%; height: 100%; object-fit: contain; }
#results .ok { color: #0a0; } #results .miss { color: #c00; }
"""


def render_answer(answer: Answer, seconds: float | None = None) -> str:
    from cirlab.retrieval.visualize import data_uri

    cells, hit_rank = [], next((h.rank for h in answer.hits if h.target), None)
    if answer.targets:
        status = (
            f'<span class="ok">target at rank {hit_rank}</span>'
            if hit_rank
            else f'<span class="miss">target {html.escape(", ".join(answer.targets))} not in the top {len(answer.hits)}</span>'
        )
        if not hit_rank:  # show what should have been found
            status += "".join(
                f'<figure class="tgt" title="{html.escape(t)}"><img src="{data_uri(p)}" alt="target"></figure>'
                for t, p in answer.target_tiles
            )
    else:
        status = "not a dataset query: no known target"
    timing = f" · {seconds * 1000:.0f} ms" if seconds is not None else ""
    if answer.hits and answer.hits[0].path is None:  # captions
        items = "".join(
            f'<li class="{"hit" if h.target else "res"}" data-rank="{h.rank}" data-score="{h.score:.6f}"'
            f' data-name="{html.escape(h.name)}">{html.escape(h.name)} <small>({h.score:.4f} · '
            f"{html.escape(h.image)})</small></li>"
            for h in answer.hits
        )
        return f'<div class="summary">{status}{timing}</div><ol class="captions">{items}</ol>'
    for h in answer.hits:
        mark = " ✓ target" if h.target else ""
        cells.append(
            f'<figure class="{"hit" if h.target else "res"}" data-rank="{h.rank}" data-score="{h.score:.6f}" '
            f'data-name="{html.escape(h.name)}" title="{html.escape(h.name)}">'
            f'<img src="{data_uri(h.path)}" alt="{html.escape(h.name)}">'
            f"<figcaption>#{h.rank} · {h.score:.4f}{mark}</figcaption></figure>"
        )
    return f'<div class="summary">{status}{timing}</div><div class="row">{"".join(cells)}</div>'


def header_markdown(backend: DemoBackend, run: Path) -> str:
    g = backend.gallery
    lines = [
        f"### cirlab demo — `{run.name}`",
        f"Method **{backend.method_name}** (stage `{backend.retriever.stage}`), gallery: {g.description}.",
    ]
    if not backend.captions_mode:
        lines.append(
            "The reference is left out of its own ranking."
            if backend.exclude_reference
            else "The reference stays in the ranking (the dataset's protocol)."
        )
    if g.unreadable:
        shown = "\n".join(f"- `{p}`: {why}" for p, why in g.unreadable[:20])
        more = f"\n- ... and {len(g.unreadable) - 20} more" if len(g.unreadable) > 20 else ""
        lines.append(f"\n**{len(g.unreadable)} unreadable image(s) left out of the gallery:**\n{shown}{more}")
    return "\n\n".join(lines)
