"""The Blocks layout itself (no server): one tab per built stage, and nothing else inside gr.Tabs - a component
created in the Tabs context but outside a Tab becomes a phantom tab button that mirrors the selected one."""

from __future__ import annotations


def test_tabs_hold_only_the_stage_tabs(workspace):
    import gradio as gr

    from pipelines.serving.registry import ModelRegistry
    from studio.app import build_app
    from studio.handlers.common import Context

    demo = build_app(Context(workspace, ModelRegistry(), prepare_hf=False))
    (tabs,) = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert [type(c).__name__ for c in tabs.children] == ["Tab"] * 6
    assert [c.label for c in tabs.children] == ["Model", "Data", "Train", "Chat", "RAG", "Export"]
