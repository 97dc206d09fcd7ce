"""Zero-shot accuracy with lm-evaluation-harness's scoring conventions, on the live (masked) model.

* :mod:`.tasks`: the task registry and the local task files' schemas;
* :mod:`.scoring`: lm-eval's tokenization and log-likelihood scoring through the engine, metrics, and the
  game's task utility;
* :mod:`.lmeval`: the bridge to lm-evaluation-harness itself (an optional extra).
"""

from shapprune.zeroshot.lmeval import check_lm_eval_available, evaluate_with_lm_eval
from shapprune.zeroshot.scoring import (
    DEFAULT_MAX_LENGTH,
    SCORING_VERSION,
    TOKENIZER_INFINITY,
    PairEncoder,
    TaskEvaluator,
    continuation_logprobs,
    encode_docs,
    encode_pair,
    evaluate_tasks,
    headline,
    lambada_perplexity,
    make_evaluator,
    mean_headline,
    multiple_choice_metrics,
    parse_utility,
    prefix_token_id,
    resolve_max_length,
    score_docs,
    score_pairs,
    task_metrics,
)
from shapprune.zeroshot.tasks import (
    TASKS,
    Doc,
    TaskSpec,
    check_limit,
    load_task_docs,
    load_tasks,
    parse_tasks,
    task_file,
)

__all__ = [
    "DEFAULT_MAX_LENGTH", "SCORING_VERSION", "TASKS", "TOKENIZER_INFINITY", "Doc", "PairEncoder", "TaskEvaluator",
    "TaskSpec", "check_limit", "check_lm_eval_available", "continuation_logprobs", "encode_docs", "encode_pair",
    "evaluate_tasks", "evaluate_with_lm_eval", "headline", "lambada_perplexity", "load_task_docs", "load_tasks",
    "make_evaluator", "mean_headline", "multiple_choice_metrics", "parse_tasks", "parse_utility",
    "prefix_token_id", "resolve_max_length", "score_docs", "score_pairs", "task_file", "task_metrics",
]
