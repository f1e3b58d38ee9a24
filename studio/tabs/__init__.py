"""One module per stage tab; each has build(ctx) which lays out the tab and wires its events (export_push.py: a
section of the Export tab, built by export.py)."""
