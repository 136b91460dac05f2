"""Profiling: parameter attribution, FLOPs against hand-derived counts, preset ratios, the CLI."""

from __future__ import annotations

import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dlip_ds
from dlip_ds.models.presets import preset_config
from dlip_ds.models.vlp import VLPModel
from dlip_ds.profile import param_counts, profile_model


def test_param_counts_attribute_every_parameter_once():
    m = dlip_ds.load_model("test-tiny", momentum=True)
    c = param_counts(m)
    online = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("momentum."))
    assert c["total"] == online == sum(v for k, v in c.items() if k not in ("total", "momentum"))
    cross = sum(p.numel() for layer in m.text.layers if layer.has_cross for p in layer.cross_attn.parameters())
    assert c["fusion"] == cross + sum(p.numel() for p in m.itm_head.parameters())
    assert c["momentum"] == sum(p.numel() for p in m.momentum.parameters()) > 0
    assert c["decoder"] == sum(p.numel() for p in m.decoder.parameters()) + sum(p.numel() for p in m.lm_head.parameters())


def _matmul_flops(cfg, text_len: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of itc/itm for batch 1, from the architecture alone."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    n = 1 + (v.image_size // v.patch_size) ** 2
    dv, hv = v.width, int(v.width * v.mlp_ratio)
    vision = 2 * (n - 1) * dv * 3 * v.patch_size ** 2 + v.depth * (
        2 * n * dv * 3 * dv + 2 * 2 * n * n * dv + 2 * n * dv * dv + 2 * 2 * n * dv * hv)
    L, w = text_len, t.width
    self_layer = 2 * L * w * 3 * w + 2 * 2 * L * L * w + 2 * L * w * w + 2 * 2 * L * w * t.intermediate
    cross = 2 * L * w * w + 2 * 2 * n * dv * w + 2 * 2 * L * n * w + 2 * L * w * w
    vision += 2 * dv * e  # encode_image always projects [CLS] for ITC
    return {"vision": vision, "itc": vision + t.depth * self_layer + 2 * w * e,
            "itm": vision + t.depth * self_layer + cfg.fusion.layers * cross + 2 * w * 2}


def test_flops_equal_the_hand_count():
    for fusion in ({"layers": 2}, {"layers": 1}):
        m = dlip_ds.load_model("test-tiny", fusion=fusion)
        r = profile_model(m, text_len=11, caption_len=8, num_beams=2, repeats=1, warmup=0)
        ref = _matmul_flops(m.cfg, 11)
        assert r["flops"]["itc"] == ref["itc"] and r["flops"]["itm"] == ref["itm"]
        assert r["flops"]["caption"] > ref["vision"]
        assert set(r["latency_ms"]) == {"itc", "itm", "caption"}


def _meta_profile(name: str) -> tuple[int, dict[str, int]]:
    """Parameters and itc/itm FLOPs of a preset without allocating it (meta tensors)."""
    with torch.device("meta"):
        m = VLPModel(preset_config(name))
        size = m.cfg.vision.image_size
        px, ids = torch.empty(1, 3, size, size), torch.zeros(1, 35, dtype=torch.long)
        flops = {}
        for task, fn in (("itc", lambda: m.itc_features(px, ids, None)), ("itm", lambda: m.itm_logits(px, ids, None))):
            counter = FlopCounterMode(display=False)
            with counter, sdpa_kernel(SDPBackend.MATH):
                fn()
            flops[task] = counter.get_total_flops()
    return param_counts(m)["total"], flops


def test_dlip_small_meets_the_paper_budget():
    """DLIP: at most 22.4% of the teacher's parameters and 24.8% of its FLOPs."""
    teacher_params, teacher_flops = _meta_profile("blip-base")
    params, flops = _meta_profile("dlip-small")
    assert params / teacher_params <= 0.224
    assert all(flops[t] / teacher_flops[t] <= 0.248 for t in ("itc", "itm"))
    assert teacher_flops["itc"] == _matmul_flops(preset_config("blip-base"), 35)["itc"]


def test_profile_cli_json(capsys):
    from dlip_ds.cli import main

    assert main(["profile", "--model", "demo-teacher", "--vs", "demo-student", "--json", "--repeats", "1",
                 "--caption-len", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    a, b, r = out["a"], out["b"], out["ratios_b_over_a"]
    assert r["params"] == b["params"]["total"] / a["params"]["total"] <= 0.25
    assert set(r["flops"]) == set(r["latency_ms"]) == {"itc", "itm", "caption"}
    assert all(0 < r["flops"][t] < 1 and r["flops"][t] == b["flops"][t] / a["flops"][t] for t in r["flops"])
    assert all(v > 0 for v in a["latency_ms"].values())
    assert main(["profile", "--model", "test-tiny", "--image-size", "48", "--repeats", "1"]) == 0
    assert "48 px" in capsys.readouterr().out
