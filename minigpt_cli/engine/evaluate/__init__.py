"""`minigpt eval`: several runs measured on the same held-out data, side by side.

Three kinds of evidence, each computed the way the training stage that produced a run computes
it, so a number here can be checked against the run's own metrics.jsonl:

- Held-out text: perplexity and bits per byte (`ppl`, `bpb`). Each document is scored from an
  end-of-text id (how pretraining separates documents) in non-overlapping windows of the model's
  context, as pretraining's validation does; bytes come from `token_byte_lengths`, so bits per
  byte are exact and comparable between runs with different tokenizers.
- Answers to held-out prompts, greedy and batched (`greedy.greedy_complete`), prompted in the one
  chat template for every run, base runs included (zero-shot, exactly as SFT's held-out check):
  exact match (`exact_match.normalise_answer`), BLEU (sacrebleu; `13a` tokens for English, `zh` for
  Chinese), ROUGE-1/2/L F1 (words for English, characters for Chinese), per task family and
  overall.
- Preference pairs: accuracy of the implicit reward log p_run(reply) - log p_parent(reply) (what
  DPO optimises, beta only scales it) when the run has a parent, else of the mean log-probability
  per reply token (a base model has no reference to be compared with). Ties count as wrong.

Runs are loaded one at a time and freed before the next; a parent needed only as a reference is
loaded once, scored, and freed too. Progress goes out as events (stage "eval"); nothing prints.

Where each piece lives: `run.run_eval` is the verb's entry (it loads and measures every run);
`report` holds what it is asked and what it answers (`EvalOptions`, `EvalReport`: the --json
schema); `data` reads the held-out records; `answers` and `preferences` score one run's answers and
pairs. The metrics themselves (perplexity, bits per byte, BLEU, ROUGE) are `engine.metrics.text`.
Nothing is imported here, so the CLI can import `report` without torch.
"""
