"""The shipped BLIP distillation recipes at their real sizes, as a new user starts them.

A random `blip-base` teacher (252M parameters) and the recipe's student, 224-px synthetic shards, a
30522-word WordPiece vocabulary (30524 ids with [DEC] and [ENC]) and one KD term of every kind on
every module: representations x 4, self-attention x 4 and cross-attention x 2 with relation heads,
logits x 3. Two optimizer steps: dlip-base under ZeRO-2 on one rank, dlip-small under ZeRO-3 on two
ranks with the smallest batch ITM allows (dlip-small under ZeRO-2 adds nothing these two do not
cover, at 45 s of CI). Each run's peak resident memory is printed (`pytest -s`
shows it) so that growth shows up in CI logs.

The runs are fp32 (teacher and student): on a CPU without bf16 matrix units a bf16 matmul is 4-70x
slower than fp32 (measured for benchmarks/kernels.py), which would make these runs minutes each.
bf16 and fp16 are covered at these sizes by the kernel precision tests (tests/test_kernels_precision.py),
through the engine by tests/test_precision.py and tests/test_train_runs.py, and at real size on a
GPU by benchmarks/distill_check.py (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
VOCAB_WORDS = 30522  # bert-base-uncased's size; the tokenizer adds [DEC] and [ENC]

# One term of every kind on every module; relation heads 6 divide both sides' attention widths
# (blip-base 12 x 64 = 768; dlip-small 6 x 64 = 384; dlip-base 12 x 64).
EVERY_TERM = ("[{kind: repr, module: vision}, {kind: repr, module: text}, {kind: repr, module: fusion},"
              " {kind: repr, module: decoder},"
              " {kind: attn, module: vision, relation_heads: 6}, {kind: attn, module: text, relation_heads: 6},"
              " {kind: attn, module: fusion, relation_heads: 6}, {kind: attn, module: decoder, relation_heads: 6},"
              " {kind: attn, module: fusion, attn: cross, relation_heads: 6},"
              " {kind: attn, module: decoder, attn: cross, relation_heads: 6},"
              " {kind: logit, module: itc}, {kind: logit, module: itm}, {kind: logit, module: lm}]")


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """224-px synthetic shards and a bert-base-sized WordPiece vocabulary that covers their words."""
    from dlip_ds.data.synth import synth

    root = tmp_path_factory.mktemp("real")
    synth(root / "synth", train=16, test=2, image_size=224, shard_size=16)
    words = (root / "synth" / "tokenizer" / "vocab.txt").read_text().split("\n")
    words = [w for w in words if w]
    filler = [f"[unused{i}]" for i in range(VOCAB_WORDS - len(words))]
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("\n".join(words + filler) + "\n")
    return root


def _fp32_config(stage: int, folder: Path) -> str:
    """A shipped ZeRO config of this stage without its bf16 section."""
    config = json.loads((REPO / "ds_configs" / f"zero{stage}_bf16.json").read_text())
    config.pop("bf16")
    path = folder / f"zero{stage}_fp32.json"
    path.write_text(json.dumps(config))
    return str(path)


def _train(real_data: Path, out: Path, recipe: str, stage: int, ranks: int, batch: int) -> dict:
    ds_config = _fp32_config(stage, out.parent)
    sets = [f"data.train_shards={real_data / 'synth' / 'train'}", "data.eval_shards=",
            f"data.tokenizer={real_data / 'tokenizer'}", f"data.batch_size={batch}", "data.workers=0",
            "data.shuffle_buffer=4", "teacher.source=blip-base", "teacher.dtype=fp32", "student.init.vision=random",
            "student.init.text=random", f"loss.kd={EVERY_TERM}", "train.max_steps=2", "train.warmup_steps=1",
            "train.log_every=1", "train.ckpt_every=100", "train.eval_every=0"]
    cmd = ["-m", "dlip_ds.train", "--config", recipe, "--deepspeed", ds_config, "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd]
    # The machine's cores shared among the ranks (at most 4 threads each): a lone rank gets 2 in CI.
    env = {**ENV, "OMP_NUM_THREADS": str(max(1, min(4, (os.cpu_count() or 1) // ranks)))}
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, sys.executable, *cmd], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    peak_kib = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return {"stdout": proc.stdout, "peak_gib": peak_kib / 2**20}


# A fresh process per run, so that its children's peak (the largest rank's) is this run's alone.
PEAK_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _losses(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        values.update({tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"] if tag.startswith("loss/")})
    return values


@pytest.mark.parametrize("recipe, stage, ranks, batch", [
    ("blip-distill-dlip-small", 3, 2, 2),
    ("blip-distill-dlip-base", 2, 1, 2),
])
def test_shipped_recipe_runs_every_kd_term_at_real_size(real_data, tmp_path, recipe, stage, ranks, batch):
    run = _train(real_data, tmp_path / "run", recipe, stage, ranks, batch)
    losses = _losses(tmp_path / "run")
    names = ["kd_repr_vision", "kd_repr_text", "kd_repr_fusion", "kd_repr_decoder", "kd_attn_self_vision",
             "kd_attn_self_text", "kd_attn_self_fusion", "kd_attn_self_decoder", "kd_attn_cross_fusion",
             "kd_attn_cross_decoder", "kd_logit_itc", "kd_logit_itm", "kd_logit_lm", "itc", "itm", "lm"]
    missing = [n for n in names if f"loss/{n}" not in losses]
    assert missing == [], f"no TensorBoard scalar for {missing}; logged: {sorted(losses)}"
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert config["model"]["text"]["vocab_size"] == VOCAB_WORDS + 2
    assert run["peak_gib"] > 0.5  # a real-size teacher was loaded
    print(f"\n{recipe} ZeRO-{stage} fp32 x{ranks} ranks, batch {batch}: peak RSS of the largest process "
          f"{run['peak_gib']:.2f} GiB")
