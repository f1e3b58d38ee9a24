"""RAG: chat with your documents. A knowledge base is a folder rag/<name>/ (see store.py for what is in it).

    store.py     create / open / list / delete knowledge bases, remove documents; the SQLite record of truth; a
                 damaged database (DamagedKB) set aside so the knowledge base can be rebuilt from its kept documents
    extract.py   PDF (pypdf, page by page), text and Markdown to text, with a clear refusal for every unusable file
    chunk.py     passages that fit the embedder (its own tokenizer), at paragraph and sentence boundaries
    embed.py     sentence-transformers embeddings (the bundled all-MiniLM-L6-v2 by default), normalised, batched
    index.py     FAISS (exact, or HNSW when large), BM25 keywords (bm25s), reciprocal rank fusion
    ingestion.py documents -> chunks -> vectors, one document per transaction; the ingest job
    retrieve.py  search(): ranked passages with scores and origin (vector, keyword or hybrid)
    answer.py    stream_answer(): passages fitted to the model's context window, cited answers, "nothing relevant"
    evaluation.py hit@1 / hit@5 / MRR per search mode on an automatic or a user's evaluation set

    from pipelines import rag
    kb = rag.create(ws, "manuals")
    rag.ingest(ws, "manuals", [Path("guide.pdf")])
    rag.search(kb, "how do I reset it?")
"""

from .answer import THRESHOLD, RagEvent, fit_passages, stream_answer
from .evaluation import Question, auto_questions, evaluate, questions_from_csv
from .ingestion import IngestReport, ingest, rebuild
from .retrieve import MODES, Passage, search
from .store import KB, DamagedKB, create, delete, list_kbs, open_kb, remove_documents

__all__ = ["KB", "MODES", "THRESHOLD", "DamagedKB", "IngestReport", "Passage", "Question", "RagEvent",
           "auto_questions", "create", "delete", "evaluate", "fit_passages", "ingest", "list_kbs", "open_kb",
           "questions_from_csv", "rebuild", "remove_documents", "search", "stream_answer"]
