"""Evaluation during training: retrieval metrics of the student as it is now."""

from __future__ import annotations

from dlip_ds.engine.checkpoint import student_from_state
from dlip_ds.engine.distributed import DistEnv, barrier

EVAL_K = 16  # ITM re-ranks this many ITC candidates per query: cheap enough to run mid-training


def evaluate_all_ranks(student, eval_set, tokenizer, env: DistEnv, *, zero3: bool, batch_size: int) -> dict:
    """Collective: retrieval metrics (ITC ranking, ITM re-rank of the top EVAL_K) of an fp32 copy of
    the student, computed on rank 0; every rank takes part in gathering ZeRO-3 shards for the copy.
    Other ranks return {}."""
    import deepspeed

    from dlip_ds.eval.retrieval import evaluate_retrieval

    metrics: dict = {}
    with deepspeed.zero.GatheredParameters(list(student.parameters()), enabled=zero3):
        if env.is_main:
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if env.is_main:
        model = student_from_state(student.cfg, state, "the training student").to(env.device)
        metrics = evaluate_retrieval(model, eval_set, tokenizer, k=EVAL_K, batch_size=batch_size,
                                     device=env.device, rank=0, world_size=1, progress=False)
    barrier()
    return metrics
