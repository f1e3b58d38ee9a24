"""MacTuner studio: the Gradio UI. It only translates between components and `pipelines/`."""
