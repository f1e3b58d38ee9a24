"""Input components that refuse a value they cannot take with a message naming the field: text in a number field or
a slider, a malformed chat history, a file that is not a file - sent through the API (the page always sends good
values). Without them Gradio answers only "has raised an exception" for such a value.

They are Gradio's own components, subclassed through its component API: `preprocess` (the value -> what the handler
receives) turns a failure into a gr.Error, and the component's `data_model` (the shape Gradio checks first) into
one that does the same. Same names as Gradio's, so the page draws them as before: the tabs write `fields.Number(...)`
where they would write `gr.Number(...)`. `empty_after` readies a file box for the next file.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import gradio as gr
from pydantic import ValidationError

log = logging.getLogger("mactuner.studio")


def refusal(component: gr.components.Component, value: Any, cause: Any) -> gr.Error:
    """The error for `value` refused by `component`, naming the field (its label) and why; logged as one line."""
    label = getattr(component, "label", None) or type(component).__name__
    shown = repr(value)[:60]
    if isinstance(component, (gr.Slider, gr.Number)):
        message = f"'{label}' must be a number, not {shown}."
    elif isinstance(component, gr.Chatbot):
        message = (f"The chat history ('{label}') is malformed: it must be a list of messages, each "
                   "{'role': 'user' or 'assistant', 'content': text}.")
    else:
        text = str(cause).strip()
        why = text.splitlines()[0][:200] if text else type(cause).__name__
        message = f"'{label}' does not accept {shown}: {why}."
    log.info("refused (input): %s", message)
    return gr.Error(message, print_exception=False)


def _naming_model(model: type, component) -> type:
    """`model` (the component's data model) whose validation failure is the component's refusal. It keeps the
    model's name and docstring: the API's schema of the field stays the same."""

    def model_validate(cls, obj, *args, **kwargs):
        try:
            return super(naming, cls).model_validate(obj, *args, **kwargs)
        except ValidationError as e:
            raise refusal(component, obj, e.errors()[0].get("msg", e)) from None

    naming = type(model.__name__, (model,), {"model_validate": classmethod(model_validate),
                                             "__module__": model.__module__, "__doc__": model.__doc__})
    return naming


class _NamesTheField:
    """Mixin for a Gradio component: a value it cannot take becomes a gr.Error naming the field."""

    def _name_the_field_in_data_model(self) -> None:
        """Gradio checks a value against `data_model` before `preprocess`: that check names the field too."""
        if getattr(self, "data_model", None) is not None:
            self.data_model = _naming_model(self.data_model, self)

    @classmethod
    def get_component_class_id(cls) -> str:
        """Gradio's own component's: the page loads and draws it as that component."""
        gradio_class = next(c for c in cls.__mro__ if c.__module__.startswith("gradio."))
        return gradio_class.get_component_class_id()

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the value is the sender's: say which field
            raise refusal(self, payload, e) from None


class Number(_NamesTheField, gr.Number):
    pass


class Slider(_NamesTheField, gr.Slider):
    pass


class CheckboxGroup(_NamesTheField, gr.CheckboxGroup):
    pass


class Chatbot(_NamesTheField, gr.Chatbot):
    @functools.wraps(gr.Chatbot.__init__)  # Gradio reads a component's settings by the parameters of its __init__
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name_the_field_in_data_model()


class File(_NamesTheField, gr.File):
    @functools.wraps(gr.File.__init__)  # Gradio reads a component's settings by the parameters of its __init__
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name_the_field_in_data_model()


def empty_after(event, box: gr.File) -> None:
    """Empty the file box `box` once `event` (the handler of its upload) has ended, well or not: a filled Gradio file
    box takes no second file. Both outcomes are wired, as Gradio's page (6.31) runs a `.then` after a success only."""
    for follow in (event.success, event.failure):
        follow(lambda: None, None, box, api_visibility="private", show_progress="hidden")
