"""`tokenizer_from_config` with an empty `data.tokenizer` (issue 13): the synth `tokenizer/` folder is
looked for beside the first shard's folder, also when the train shards are a brace list of absolute
paths (`{/a/x.tar,/b/y.tar}`) or a `::`-joined list, which are not paths themselves."""

from __future__ import annotations

import pytest

from dlip_ds.config import ConfigError, DataConfig
from dlip_ds.data.text import tokenizer_from_config


@pytest.fixture
def layout(tmp_path):
    """tmp/a/train/{x,z}.tar with tmp/a/tokenizer/ (what `dlip-ds synth` writes), and tmp/b/y.tar elsewhere."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]
    (tmp_path / "a" / "tokenizer").mkdir(parents=True)
    (tmp_path / "a" / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "a" / "train").mkdir()
    (tmp_path / "b").mkdir()
    for shard in ("a/train/x.tar", "a/train/z.tar", "b/y.tar"):
        (tmp_path / shard).write_bytes(b"")
    return tmp_path


def test_brace_list_of_absolute_paths_uses_the_first_shards_folder(layout):
    a, b = layout / "a" / "train" / "x.tar", layout / "b" / "y.tar"
    for spec in (f"{{{a},{b}}}", f"{a}::{b}", str(layout / "a" / "train" / "{x,z}.tar"), str(layout / "a" / "train"),
                 [f"{{{a},{b}}}"]):
        tok = tokenizer_from_config(DataConfig(tokenizer="", train_shards=spec))
        assert tok.convert_tokens_to_ids("dog") == 6, spec
    with pytest.raises(ConfigError, match="no synth tokenizer at"):  # the first shard decides: b/ has none beside
        tokenizer_from_config(DataConfig(tokenizer="", train_shards=f"{{{b},{a}}}"))
    with pytest.raises(ConfigError, match="remote"):
        tokenizer_from_config(DataConfig(tokenizer="", train_shards="pipe:cat x.tar"))
