"""`cirlab-demo RUN`: an interactive retrieval page over a finished run (Gradio, `pip install 'cirlab[demo]'`).

    cirlab-demo outputs/runs/<run> [--gallery DIR] [--port 7860] [--host 127.0.0.1] [-k 10] [--auth USER:PW]

Loads the run's final stage with `cirlab.load`, embeds the gallery once through the feature cache
(the run's own test gallery by default, or every image under `--gallery`), then serves a page where a
person picks a reference (a dataset query, a searchable grid of the gallery, or an upload), types the
modification text and sees the top-k with rank and cosine score. The search is `Retriever.search`
(evaluation's query embedding and ranking: a dataset query shows its row of predictions.test.json); the
reference is left out of its own ranking as the run's protocol says (always for a `--gallery` folder); a
dataset query's true target is outlined green. Every method's run works, SEARLE-OTI included (see
`SearleOTI.oti_tokens`). Captions runs (`+method=crossmodal`) get text -> image and image -> caption
search instead, ranked by `cirlab.retrieval.search` too.

One job per module: `gallery` (what is searched), `backend` (the search, no UI: `DemoBackend`,
`load_backend`), `page` (the HTML of answers), `ui` (the Gradio widgets; Gradio serves only copies of
the images the page shows, `ShownImages`), `app` (the command: arguments, serving, `main`).
"""

from cirlab.demo.app import main
from cirlab.demo.backend import load_backend

__all__ = ["load_backend", "main"]
