"""Write assets/sample_guide.pdf: the small PDF the RAG tab offers to try (`.venv/bin/python scripts/make_sample_pdf.py`,
with fpdf2 installed - a test dependency). Four pages of plain facts, so that questions have answers on known pages."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

PAGES = [
    ("Fine-tuning with LoRA",
     "LoRA trains a small low-rank adapter beside each frozen weight matrix instead of the whole model. The rank r "
     "sets the adapter's size: ranks from 8 to 64 are typical, and the update is scaled by alpha divided by r. "
     "Because the base model stays frozen, a LoRA run fits in far less memory than full fine-tuning.\n\n"
     "A learning rate between 1e-4 and 3e-4 suits most LoRA runs. Training only on the assistant's replies keeps "
     "the model from learning to repeat the prompts. Checkpoints are saved every few steps so that a stopped run "
     "can be resumed where it left off."),
    ("Quantizing to GGUF",
     "GGUF is the file format of llama.cpp, and Ollama and LM Studio read it too. A merged model is first converted "
     "to a float GGUF such as f16, then quantized. Q8_0 keeps eight bits per weight and loses almost nothing; "
     "Q4_K_M keeps about four and a half bits and is a quarter of the f16 size.\n\n"
     "A small fine-tune can be erased by a coarse quantization. The validation step compares the exported file "
     "with the tuned model and the base model, and says whether the fine-tune survived."),
    ("Chat templates",
     "A chat template turns a list of messages into the exact text a model was trained on, with its special tokens "
     "marking where each turn begins and ends. Gemma writes <start_of_turn>user and <start_of_turn>model; many other "
     "models use ChatML with <|im_start|> and <|im_end|>.\n\n"
     "A base model has no chat template and simply continues text. Fine-tuning it on conversations teaches it the "
     "turns, and the template is saved with the adapter so that chat and export render prompts the same way."),
    ("Running on a laptop",
     "On Apple silicon the studio trains on the GPU through Metal (MPS). On a plain CPU it trains in float32, "
     "using every physical core. A 270 million parameter model trains at a few hundred tokens per second on a "
     "recent laptop CPU.\n\n"
     "The default model is Gemma 3 270M. It ships inside a Python package, so the studio works without a network "
     "connection from the first start."),
]


def main() -> int:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("MacTuner field guide")
    pdf.set_author("MacTuner")
    pdf.set_creation_date(datetime(2026, 1, 1, tzinfo=timezone.utc))  # a reproducible file
    for title, body in PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 16)
        pdf.cell(0, 12, title, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 6, body)
    out = Path(__file__).resolve().parents[1] / "assets" / "sample_guide.pdf"
    pdf.output(str(out))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
