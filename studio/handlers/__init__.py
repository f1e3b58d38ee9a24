"""Handlers: UI values in, a pipelines call, UI-ready values out. No layout here (see studio/tabs/).

    common.py    Context, ui_errors, named-view helpers, per-session state, small UI helpers
    model.py     the Model tab (and the header)
    data.py, train.py, chat.py, export.py    one module per tab
    push.py      the Export tab's "Publish to the Hub" section
    train_multi.py  the Train tab's "Train on several machines" (the commands for N machines)

Each tab's events are the methods of one handler object made with the Context (`ChatHandlers(ctx)`,
`RagHandlers(ctx)`, ...), which Gradio wires as they are; each returns (or streams) a named view, a NamedTuple whose
fields name the outputs, and the tab passes the same NamedTuple of its components as `outputs`. Tests call them
directly.
"""
