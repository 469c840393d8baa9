"""Extraction: a teacher LLM writes a rationale and a label for every input of a task split.

`stepwise extract --task T --split S --teacher {replay,vllm,openai} --out DIR` (see `extraction.run`).

Output folder (the contract the training stage reads; `stepwise.artifacts.read_records(DIR)` returns the records):
    manifest.json       config (task, split, backend, model, sampling, structured, prompt_hash) and its hash,
                        expected_records, shards, counts (records, ok, malformed, error, parse_rate,
                        teacher_accuracy, tokens_in, tokens_out, failure_reasons), complete, last_run summary
    shard-<hash>.jsonl  one JSON record per input, exactly one per id across all shards

Record fields:
    id             the stable Example.id
    input          the task input text (question + answer choices, or premise + hypothesis)
    label          the gold label ("" where the data has none)
    choices        the answer choices of a multiple-choice example, else null
    completions    the teacher's raw completion(s): n samples, or one shipped completion for replay
    rationale      the parsed rationale (of the winning sample when n > 1)
    teacher_label  the parsed teacher label ("" unless status is "ok")
    status         "ok" | "malformed" (the completion did not parse) | "error" (no completion: prompt too
                   long, server error after retries, no shipped completion)
    reason         why a record is not ok ("" when ok)
    correct        teacher_label equals the gold label (false when not ok)
    votes          parsed-label vote counts over the n samples ({} when none parsed)
    tokens_in      prompt tokens (0 for replay)
    tokens_out     generated tokens over all samples (0 for replay)
    teacher        {backend, model, sampling {n, temperature, top_p, max_tokens, seed}, structured, prompt_hash}

This package imports with the standard library only; the engines load inside the backends.
"""

from stepwise.artifacts import iter_records, read_records

__all__ = ["iter_records", "read_records"]
