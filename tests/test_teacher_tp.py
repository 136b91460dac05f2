"""`teacher.tp_size > 1` is refused before anything loads (issue 13).

Two gloo ranks with tp_size=2 crashed in the first teacher forward (`shape '[2, 17, 2, -1]' is invalid`):
DeepSpeed's automatic tensor parallelism shards the projections while our attention split the heads by
their full count. Past that, it cannot be made right here: AutoTP slices the ViT's fused qkv in 64-channel
grains (a rank gets all of q and part of k), takes a block's policy from its first layer (a stack with
cross-attention only in its last layers gets a column-parallel cross-attention output), creates one TP
group of ranks 0..tp-1 whatever the world size, its CPU all-reduce kernel ignores the group (and crashed
with a segmentation fault on two gloo ranks), and every data-parallel rank feeds the teacher its own
micro-batch, which the ranks of a TP group would have to share."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("tp_size", [2, 0])
def test_recipe_with_a_tensor_parallel_teacher_is_refused(tp_size):
    from dlip_ds.config import ConfigError
    from dlip_ds.recipe import load_recipe

    with pytest.raises(ConfigError, match=rf"teacher\.tp_size={tp_size}: only 1 is supported"):
        load_recipe("tiny-distill", [f"teacher.tp_size={tp_size}"])
    assert load_recipe("tiny-distill").teacher.tp_size == 1


def test_to_inference_refuses_a_tensor_parallel_teacher_built_in_code():
    import torch

    from dlip_ds.config import ConfigError, TeacherConfig
    from dlip_ds.engine.teacher import to_inference

    with pytest.raises(ConfigError, match=r"teacher\.tp_size=2: only 1 is supported"):
        to_inference(torch.nn.Linear(1, 1), TeacherConfig(source="x", tp_size=2), torch.device("cpu"))
