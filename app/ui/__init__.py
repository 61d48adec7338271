"""The Textual app. Only `main.py` imports this package; the runtime never imports it.

    from app.ui import run
    run(make_runtime, config=config, doc_paths=args.doc, make_runtime_for=make_runtime_for)

`make_runtime(status_cb)` builds the `Runtime` (slow: loads the model); it is called on the
model thread after the first frame is drawn, and reports loading stages with `status_cb(text)`.
`make_runtime_for(model_id, status_cb)` does the same for another model; `/model ID` uses it
(without it, `/model` explains that it is unavailable). `policy`: the spec the app switches
each freshly loaded runtime to (main.py builds it under `auto`, so a policy that cannot apply
here, e.g. `locret` with no retaining heads, leaves the model loaded and the app asks what to
do); None keeps the runtime as built.
"""
from __future__ import annotations

from typing import Callable, Iterable


def run(make_runtime: Callable[[Callable[[str], None]], object], *, config=None,
        doc_paths: Iterable[str] = (),
        make_runtime_for: Callable[[str, Callable[[str], None]], object] | None = None,
        policy: str | None = None) -> None:
    """Run the chat app until the user quits. `config`: an `app.config.Config` (None: read the
    user's config file); `doc_paths`: documents to load once the model is up."""
    from app.config import load_config
    from app.ui.app import VramchatApp

    app = VramchatApp(make_runtime, config=config if config is not None else load_config(),
                      doc_paths=list(doc_paths), make_runtime_for=make_runtime_for, policy=policy)
    app.run()
