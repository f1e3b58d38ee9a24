"""Data stage: read a table, map it to chat `messages`, clean it step by step (with undo), describe it (EDA as plotly
figures), preview one example through the chat template, and save named, versioned datasets in the workspace.

No gradio here; the Data tab calls these functions. From a notebook:

    from pipelines import data
    from pipelines.workspace import Workspace
    ws = Workspace.open()
    res = data.read_table("assets/sample_dataset.jsonl")          # ReadResult: df (text cells), warnings, sha256
    mapping = data.detect_mapping(res.df)                           # Mapping(format="alpaca", ...) or None
    counter = data.TokenCounter(data.load_tokenizer(data.default_tokenizer_path(ws)))
    cl = data.Cleaner(res.df)
    cl.apply(data.handle_missing, columns=data.required_columns(mapping))
    cl.apply(data.drop_duplicates, near=True)
    cl.apply(data.normalize_text)
    cl.apply(data.filter_token_length, counter=counter, mapping=mapping, max_tokens=2048, train_max_length=1024)
    lengths = data.token_lengths(cl.df, mapping, counter)          # the counts are cached: no second tokenization
    fig = data.token_length_figure(lengths, max_length=1024)
    conv = data.convert(cl.df, mapping)                             # rows, and every row left out with its reason
    print(conv.summary())                                           # "300 rows → 296 usable; 4 left out: ..."
    saved = data.save_dataset(ws, "my-set", conv.rows, data.build_meta(res, mapping, cl, conv))

Conventions
- Every cell is text (pandas `str` dtype, NaN for missing). Lists/objects found in JSON/Parquet become JSON text;
  `to_messages` parses `messages`/`conversations` cells back. Nothing is evaluated: a spreadsheet formula such as
  `=cmd|' /C calc'!A0` stays a string (a warning notes it).
- Chat shape: `[{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls"?, "loss_weight"?}, ...]`.
  The `text` format (plain text, for continued pre-training) is stored as `{"text": ...}` rows, preference pairs as
  `{"prompt", "chosen", "rejected"}` and KTO rows as messages with a `label` (see map.py).
- Token lengths count the *content* of the turns (prompt = system + user turns, response = assistant turns, total =
  the sum); a chat template adds a few tokens per turn on top.
- Long functions take `progress(fraction, message)`.

Chat templates are rendered by transformers' `apply_chat_template`, which compiles them in jinja2's
`ImmutableSandboxedEnvironment` (transformers.utils.chat_template_utils._compile_jinja_template; pinned by a test).
The trained-token mask comes from `assistant_spans` (templates.reply_spans: each reply rendered between unique
markers and located, with its end-of-turn markup; works with every template, `{% generation %}` or not) and
`span_mask` (spans -> tokens); training masks with the same two functions; see `preview_example`.

Versions live in <workspace>/datasets/<name>/v<N>/{train.jsonl, validation.jsonl, meta.json}, written into a temp
folder renamed when complete; a save never overwrites, it takes the next version number.

    read.py     files -> ReadResult (formats, encodings, dialects)      map.py      Mapping: columns -> chat messages
    clean.py    cleaning steps and the undoable Cleaner                  explore.py  token counts, stats, charts, preview
    save.py     versioned datasets in the workspace                      placeholders.py  {{name}} found and filled
"""

from .clean import (
    AppliedStep,
    Cleaner,
    StepReport,
    drop_duplicates,
    filter_token_length,
    handle_missing,
    normalize_text,
)
from .explore import (
    PREVIEW_CSS,
    Preview,
    TokenCounter,
    as_counter,
    assistant_spans,
    column_summary,
    default_tokenizer_path,
    duplicate_rows,
    length_stats,
    load_tokenizer,
    preview_example,
    render_chat,
    role_balance_figure,
    span_mask,
    token_length_figure,
    token_lengths,
    trained_spans,
    turns_figure,
)
from .map import (
    FORMATS,
    KINDS,
    ROLE_ALIASES,
    Conversion,
    Mapping,
    check_text_only,
    chosen_as_sft,
    convert,
    detect_mapping,
    media_columns,
    required_columns,
    to_messages,
    to_rows,
    validate_mapping,
)
from .placeholders import fill_placeholders, parse_placeholder_values
from .read import (
    DELIMITERS,
    ENCODINGS,
    LONG_CELL_CHARS,
    MAX_BYTES,
    SUPPORTED,
    TEXT_MODES,
    ProgressFn,
    ReadResult,
    read_table,
)
from .save import (
    NAME_RE,
    DatasetVersion,
    build_meta,
    check_name,
    list_datasets,
    load_dataset_version,
    row_kind,
    save_dataset,
)

__all__ = [
    "AppliedStep",
    "Cleaner",
    "Conversion",
    "DELIMITERS",
    "DatasetVersion",
    "ENCODINGS",
    "FORMATS",
    "KINDS",
    "LONG_CELL_CHARS",
    "MAX_BYTES",
    "Mapping",
    "NAME_RE",
    "PREVIEW_CSS",
    "Preview",
    "ProgressFn",
    "ROLE_ALIASES",
    "ReadResult",
    "SUPPORTED",
    "StepReport",
    "TEXT_MODES",
    "TokenCounter",
    "as_counter",
    "assistant_spans",
    "build_meta",
    "check_name",
    "check_text_only",
    "chosen_as_sft",
    "column_summary",
    "convert",
    "default_tokenizer_path",
    "detect_mapping",
    "drop_duplicates",
    "duplicate_rows",
    "fill_placeholders",
    "filter_token_length",
    "handle_missing",
    "length_stats",
    "list_datasets",
    "load_dataset_version",
    "load_tokenizer",
    "media_columns",
    "normalize_text",
    "parse_placeholder_values",
    "preview_example",
    "read_table",
    "render_chat",
    "required_columns",
    "role_balance_figure",
    "row_kind",
    "save_dataset",
    "span_mask",
    "to_messages",
    "to_rows",
    "token_length_figure",
    "token_lengths",
    "trained_spans",
    "turns_figure",
    "validate_mapping",
]
