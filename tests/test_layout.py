"""alloylm.layout: every run path comes from RunLayout, local and S3 alike."""

from __future__ import annotations

from alloylm.config import validate_config
from alloylm.layout import RunLayout


def test_run_layout_paths_local_and_s3(tmp_path):
    raw = {"experiment": "exp", "storage": str(tmp_path), "tokenizer": {"from": "some/model"}}
    layout = RunLayout.of(validate_config(raw))
    run = str(tmp_path / "exp")
    assert layout.run == run
    assert layout.tokenizer == f"{run}/tokenizer"
    assert layout.dataset("domain-qa") == f"{run}/data/domain-qa"
    assert layout.generation("qa") == f"{run}/data/qa.generation"
    assert layout.stage("sft") == f"{run}/stages/sft"
    assert layout.checkpoints("sft", "abc") == f"{run}/checkpoints/sft-abc"
    assert layout.search("merged", "abc") == f"{run}/searches/merged-abc"
    assert layout.search_results("merged") == f"{run}/stages/merged/search"
    assert (layout.eval, layout.comparison_table, layout.report) == (f"{run}/eval", f"{run}/eval/comparison.md", f"{run}/report")
    s3 = RunLayout.of(validate_config({**raw, "storage": "s3://bucket/prefix"}))
    assert s3.stage("sft") == "s3://bucket/prefix/exp/stages/sft"
    assert s3.checkpoints_root == "s3://bucket/prefix/exp/checkpoints"
