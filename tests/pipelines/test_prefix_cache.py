"""The GGUF worker's prefix cache, on a tiny llama loaded in this process: a kept head is restored after other
prompts (llama.cpp's own counters show only the rest evaluated) and the answer is the one a whole evaluation gives;
heads are kept per LoRA adapter and forgotten with it; the ledger's report counts what llama.cpp evaluated."""

from __future__ import annotations

import pytest

from pipelines.serving import llamacpp
from pipelines.serving.prefix_cache import MIN_HEAD, PrefixCache, PromptLedger, common_prefix


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    model = llamacpp.open_llama(tiny_gguf, n_ctx=512, n_threads=1)
    yield model
    model.close()


HEAD = "System: answer from the passages below, citing them as [1] and [2].\n\n"


def ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=True)


def greedy(llm, prompt: list[int], ledger: PromptLedger | None = None) -> tuple[str, dict | None]:
    """The greedy answer, and the ledger's report taken when the first token is sampled (as the worker does)."""
    reports = []

    def first(input_ids, _logits) -> bool:
        if ledger is not None and not reports:
            reports.append(ledger.report(llm))
        return False

    stop = llamacpp.llama_cpp_module().StoppingCriteriaList([first])
    out = llm.create_completion(prompt=prompt, max_tokens=8, temperature=0.0, stopping_criteria=stop)
    return out["choices"][0]["text"], (reports or [None])[0]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7], [8]) == 0


def test_a_kept_head_is_restored_after_other_prompts_and_answers_the_same(llm):
    a, b = ids(llm, HEAD + "[1] bread rises.\nUser: why?\n"), ids(llm, HEAD + "[1] a lighthouse.\nUser: what?\n")
    other = ids(llm, "User: something else entirely\n")
    keep = common_prefix(a, b)
    assert keep >= MIN_HEAD
    llm.reset()
    whole, _ = greedy(llm, b)  # read from an empty context
    ledger = PromptLedger()
    llm.reset()
    ledger.begin(llm, a, keep)
    _text, first = greedy(llm, a, ledger)
    assert first["head"] == "saved" and first["evaluated"] == len(a) and first["counters"]["heads"] == 1
    greedy(llm, other)  # the context holds another prompt now
    ledger.begin(llm, b, keep)
    text, second = greedy(llm, b, ledger)
    assert text == whole and second["head"] == "restored" and second["evaluated"] == len(b) - keep
    assert second["counters"]["restored"] == 1 and second["counters"]["evaluated"] == len(a) + len(b) - keep


def test_heads_are_kept_per_adapter_and_forgotten_with_it(llm):
    cache = PrefixCache()
    a, b = ids(llm, HEAD + "[1] honey.\nUser: from where?\n"), ids(llm, HEAD + "[1] a comet.\nUser: when?\n")
    keep = common_prefix(a, b)
    llm.reset()
    assert cache.prepare(llm, a, keep, adapter="run-1") == (keep, "saved")
    llm.reset()
    held, what = cache.prepare(llm, b, 0, adapter=None)  # the bare base: run-1's head is of no use
    assert (held, what) == (0, None) and cache.counters()["restored"] == 0
    assert cache.prepare(llm, b, 0, adapter="run-1") == (keep, "restored")
    cache.forget("run-1")
    llm.reset()
    assert cache.prepare(llm, b, 0, adapter="run-1") == (0, None) and cache.counters()["heads"] == 0
    assert cache.prepare(llm, b, 3, adapter=None) == (0, None)  # a head shorter than MIN_HEAD is not worth keeping
