"""One module per stage tab; each has build(ctx) which lays out the tab and wires its events."""
