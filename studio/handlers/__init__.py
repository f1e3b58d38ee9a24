"""Handlers: UI values in, a pipelines call, UI-ready values out. No layout here (see studio/tabs/).

    common.py    Context, ui_errors, bind, per-session state, small UI helpers
    model.py     the Model tab (and the header)
    data.py, train.py, chat.py, export.py    one module per tab
    push.py      the Export tab's "Publish to the Hub" section
    train_multi.py  the Train tab's "Train on several machines" (the commands for N machines)

Every handler is a plain function (tests call them directly).
"""
