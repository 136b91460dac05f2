import os

# Triton kernels are tested on the CPU under the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Everything below imports torch and dlip_ds lazily: collecting the light test files stays light.
import functools

import pytest

# --------------------------------------------------------------------------- tiny models

# A teacher for test-tiny students: deeper, wider and with more heads (relation heads for attention terms).
TINY_TEACHER = {"vision": {"width": 48, "depth": 3, "heads": 4},
                "text": {"width": 48, "depth": 3, "heads": 4, "intermediate": 96},
                "fusion": {"layers": 3}}


def build_tiny_model(*, teacher: bool = False, seed: int | None = 0, train: bool = False, **over):
    """The test-tiny preset with ModelConfig overrides: a section's dict is merged into the preset's
    (`vision={"depth": 3}`), anything else replaces the field (`momentum=True`).

    teacher: apply TINY_TEACHER first (then `over`). seed: `torch.manual_seed(seed)` before the
    weights are drawn; None draws them from the caller's RNG stream (seed once, build several).
    Returned in eval mode, or as constructed (training mode) with train=True."""
    import torch

    from dlip_ds.config import model_config_from_dict
    from dlip_ds.models.presets import preset_dict
    from dlip_ds.models.vlp import VLPModel

    if seed is not None:
        torch.manual_seed(seed)
    d = preset_dict("test-tiny")
    for changes in (TINY_TEACHER if teacher else {}, over):
        for k, v in changes.items():
            d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    model = VLPModel(model_config_from_dict(d))
    return model if train else model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    """build_tiny_model: seeded with 0 and in eval mode unless told otherwise."""
    return build_tiny_model


@pytest.fixture(scope="session")
def kd_model():
    """build_tiny_model as the distillation and step tests use it: student or teacher (teacher=True) in
    training mode, weights drawn from the caller's RNG stream (the test seeds once, then builds both)."""
    return functools.partial(build_tiny_model, seed=None, train=True)


# --------------------------------------------------------------------------- threads


@pytest.fixture
def one_thread():
    """These tensors are tiny: on a busy machine, OpenMP threads spin-waiting make each op ~10x slower.
    Not autouse: a file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
