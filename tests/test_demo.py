"""The demo: a plan in steps and counted FLOPs, a report after every stage, and a re-run that continues."""
import json
import re

import pytest

from mimkit import demo
from mimkit.engine.checkpoint import load_checkpoint

SMALL = ["model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1", "data.batch_size=32", "train.log_every=2",
         "data.num_workers=0", "train.sample_every=2", "optim.warmup_epochs=0"]


def test_demo_reports_after_each_stage_and_a_rerun_continues(fmnist_small, tmp_path, monkeypatch, capsys):
    overrides = SMALL + [f"data.spec=idx:{fmnist_small}"]
    stages = demo.plan(None, 4, overrides)
    assert [s.key for s in stages] == ["main", "mae-equal-steps", "mae-equal-flops", "probes", "report"]
    assert stages[2].steps > stages[1].steps == 4                     # VE costs more FLOPs per step than MAE
    real = demo.pretrain
    calls = []

    def interrupted(recipe, out, steps, device, overrides=()):
        calls.append(out.name)
        if len(calls) == 3:
            raise KeyboardInterrupt                                  # stopped during stage 3
        return real(recipe, out, steps, device, overrides)
    monkeypatch.setattr(demo, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path, steps=4, train_limit=300, overrides=overrides)
    report = (tmp_path / "report.md").read_text()
    assert "Stages finished: 2 of 5 (re-run the demo to continue)" in report and "(equal steps)" in report
    printed = capsys.readouterr().out
    assert "stage 1/5: Vision ELECTRA, 4 steps" in printed and "min at the speed measured now" in printed

    monkeypatch.setattr(demo, "pretrain", real)
    summary = demo.run_demo(tmp_path, steps=4, train_limit=300, overrides=overrides)
    printed = capsys.readouterr().out
    assert "stage 1/5: Vision ELECTRA, 4 steps (done)" in printed and "stage 2/5: MAE, 4 steps (equal steps) (done)" in printed
    assert re.search(r"\[demo\]   stage 3/5: MAE, \d+ steps \(equal training FLOPs.*\) \(~[\d.]+ min\)\n", printed)
    assert load_checkpoint(tmp_path / "main" / "last.pt")["step"] == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "main" / "metrics.jsonl").read_text().splitlines()
            ] == [2, 4]                                                 # not trained again
    report = (tmp_path / "report.md").read_text()
    assert "Stages finished: 5 of 5" in report and "Raw pixels are a strong baseline" in report
    results = summary["results"]
    assert set(results) >= {"raw pixels", "random init (same architecture)"} and len(results) == 5
    assert "vs random init" in report and json.loads((tmp_path / "probes.json").read_text())
    for stage in ("main", "mae-equal-steps", "mae-equal-flops"):               # pictures the report embeds
        assert f"]({stage}/loss-curves.png)" in report and (tmp_path / stage / "loss-curves.png").exists()
        assert f"]({stage}/samples/final.png)" in report and (tmp_path / stage / "samples" / "final.png").exists()
