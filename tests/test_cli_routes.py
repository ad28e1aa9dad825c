"""Every route through the command line: each `mimkit ...` line of the README parses with the real parser, and one
command of every sub-command and sub-sub-command runs end to end through `mimkit.cli.main` at tiny size."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import build_parser, main, parse_args
from tests.conftest import REPO

MAE_RECIPE = str(REPO / "configs/mae_vit-mini_fmnist-tiny.yaml")
DVAE_RECIPE = str(REPO / "configs/tokenizer/dvae_fmnist-tiny.yaml")
PICO = ["model.size=pico", "method.decoder_dim=32", "method.decoder_depth=1", "data.batch_size=16",
        "data.num_workers=0", "train.log_every=1", "train.sample_every=0"]


# ---------------------------------------------------------------------- the README's lines
def readme_commands() -> list[tuple[str, list[str]]]:
    """(line, argv after `mimkit`) for every mimkit command in the README's ```bash blocks: `mimkit`,
    `.venv/bin/mimkit` or `torchrun ... -m mimkit.cli`; continuation lines joined, comments dropped, shell
    variables set earlier in the block (`R=runs/mae/last.pt`) expanded."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            words = [re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), w) for w in words]
            if words and Path(words[0]).name == "mimkit":
                commands.append((line.strip(), words[1:]))
            elif "mimkit.cli" in words:
                commands.append((line.strip(), words[words.index("mimkit.cli") + 1:]))
    return commands


def test_readme_commands_parse_with_the_real_parser(capsys):
    commands = readme_commands()
    assert len(commands) >= 25, [line for line, _ in commands]           # the README had 25 when this was written
    parser = build_parser()
    for line, argv in commands:
        try:
            args = parse_args(argv, parser)
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {line}\n{capsys.readouterr().err}")
        named = [getattr(args, "config", None), getattr(args, "recipe", None)]   # bench's --config is a list
        for value in [v for item in named for v in (item if isinstance(item, list) else [item])]:
            if value and value.startswith("configs/"):                       # the recipes it names are shipped
                assert (REPO / value).is_file(), f"{line}: {value} does not exist"


def test_a_readme_line_with_an_unknown_option_would_fail(capsys):
    """The check above can fail: a line with an option the CLI lacks is refused by the same call."""
    with pytest.raises(SystemExit):
        parse_args(["eval", "knn", "--ckpt", "r/last.pt", "--neighbours", "20"])
    with pytest.raises(SystemExit):
        parse_args(["export", "--ckpt", "r/last.pt"])                      # --out missing
    assert "required" in capsys.readouterr().err


def test_overrides_are_accepted_anywhere_among_the_options():
    args = parse_args(["pretrain", "--config", "c.yaml", "a.b=1", "--out", "r", "c.d=2", "--steps", "3", "a.b=5"])
    assert args.overrides == ["a.b=1", "c.d=2", "a.b=5"] and args.out == "r" and args.steps == 3
    args = parse_args(["tokenizer", "train", "--out", "t", "x=1", "--config", "c.yaml", "y=2"])
    assert args.overrides == ["x=1", "y=2"] and args.config == "c.yaml"
    with pytest.raises(SystemExit):
        parse_args(["export", "--ckpt", "r", "--out", "e", "a=1"])          # export takes no overrides


def test_fine_tuning_fewer_images_than_a_batch_is_one_sentence(capsys, tmp_path, routes_context, fmnist_small):
    from tests.test_cli import error_of
    err = error_of(capsys, ["eval", "finetune", "--ckpt", str(routes_context[0] / "last.pt"), "--data",
                            f"idx:{fmnist_small}", "--train-limit", "64", "--test-limit", "32"])
    assert "cannot fill one batch of 128" in err and "--set batch_size=64" in err


# ---------------------------------------------------------------------- one route per sub-command
def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix.strip()}
    return set().union(*(leaf_commands(p, f"{prefix} {name}") for name, p in subs[0].choices.items()))


class Context:
    def __init__(self, tmp: Path, data: Path, run: Path, tokenizer: Path):
        self.tmp, self.idx, self.run, self.tokenizer = tmp, f"idx:{data}", run, tokenizer


def dalle_pickles(tmp: Path) -> list[str]:
    dall_e = pytest.importorskip("dall_e")
    enc = dall_e.Encoder(n_hid=16, vocab_size=32, input_channels=3, requires_grad=False)
    dec = dall_e.Decoder(n_init=8, n_hid=16, vocab_size=32, output_channels=3, requires_grad=False)
    torch.save(enc, tmp / "encoder.pkl")
    torch.save(dec, tmp / "decoder.pkl")
    return ["--encoder", str(tmp / "encoder.pkl"), "--decoder", str(tmp / "decoder.pkl")]


def image_folder(tmp: Path) -> str:
    folder = tmp / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return f"folder:{folder}"


LIMITS = ["--train-limit", "200", "--test-limit", "100"]
# leaf sub-command -> (argv for the context, a key of the JSON line it prints, or None: it prints no JSON line)
ROUTES = {
    "pretrain": (lambda c: ["pretrain", "--config", MAE_RECIPE, "model.size=pico", "--out", str(c.tmp / "r"),
                            "--data", c.idx, "--steps", "2", *PICO], "loss"),
    "tokenizer train": (lambda c: ["tokenizer", "train", "--config", DVAE_RECIPE, "--out", str(c.tmp / "t"),
                                   "--data", c.idx, "--steps", "2", "data.num_workers=0", "train.sample_every=0"], "loss"),
    "tokenizer eval": (lambda c: ["tokenizer", "eval", "--tokenizer", str(c.tokenizer), "--data", c.idx,
                                  "--num-images", "32"], "psnr"),
    "tokenizer show": (lambda c: ["tokenizer", "show", "--tokenizer", str(c.tokenizer), "--data", c.idx,
                                  "--num-images", "2", "--out", str(c.tmp / "show.png")], "png"),
    "tokenizer convert-dalle": (lambda c: ["tokenizer", "convert-dalle", *dalle_pickles(c.tmp), "--out",
                                           str(c.tmp / "dalle.safetensors"), "--trust-pickle"], "tokenizer"),
    "eval knn": (lambda c: ["eval", "knn", "--ckpt", str(c.run / "last.pt"), "--data", c.idx, *LIMITS], "top1"),
    "eval linear": (lambda c: ["eval", "linear", "--ckpt", str(c.run / "last.pt"), "--data", c.idx, *LIMITS,
                               "--epochs", "1"], "top1"),
    "eval attentive": (lambda c: ["eval", "attentive", "--ckpt", str(c.run / "last.pt"), "--data", c.idx, *LIMITS,
                                  "--epochs", "1"], "top1"),
    "eval finetune": (lambda c: ["eval", "finetune", "--ckpt", str(c.run / "last.pt"), "--data", c.idx,
                                 "--train-limit", "64", "--test-limit", "32", "--recipe",
                                 str(REPO / "configs/finetune/fmnist-tiny.yaml"), "--set", "epochs=1", "--set",
                                 "batch_size=32"], "top1"),
    "eval recon": (lambda c: ["eval", "recon", "--ckpt", str(c.run / "last.pt"), "--data", c.idx,
                              "--num-images", "16"], "psnr"),
    "eval robustness": (lambda c: ["eval", "robustness", "--ckpt", str(c.run / "last.pt"), "--data", c.idx,
                                   "--severities", "1", *LIMITS], "ce"),
    "eval report": (lambda c: ["eval", "report", str(c.run), "--protocols", "knn", "--data", c.idx, *LIMITS,
                               "--out", str(c.tmp / "report")], None),
    "visualize attention": (lambda c: ["visualize", "attention", "--ckpt", str(c.run / "last.pt"), "--data", c.idx,
                                       "--num-images", "2", "--out", str(c.tmp / "att.png")], "attention_png"),
    "visualize reconstruction": (lambda c: ["visualize", "reconstruction", "--ckpt", str(c.run), "--data", c.idx,
                                            "--num-images", "2", "--out", str(c.tmp / "rec.png")], "reconstruction_png"),
    "export": (lambda c: ["export", "--ckpt", str(c.run / "last.pt"), "--out", str(c.tmp / "enc")], "safetensors"),
    "data pack": (lambda c: ["data", "pack", "--data", image_folder(c.tmp), "--out", str(c.tmp / "shards")], "shards"),
    "data make-segmentation": (lambda c: ["data", "make-segmentation", "--out", str(c.tmp / "seg"), "--data", c.idx,
                                          "--train-count", "8", "--val-count", "4", "--canvas", "32"], "train"),
    "eval segment": (lambda c: ["eval", "segment", "--ckpt", str(c.run / "last.pt"), "--data", segmentation(c),
                                "--recipe", str(REPO / "configs/segment/upernet_vit-mini_fmnist-canvas.yaml"),
                                "--steps", "2", "--set", "batch_size=4", "--set", "crop_size=[32,32]", "--set",
                                "resize_short=32", "--set", "blocks=[1,2,3,4]", "--out", str(c.tmp / "segrun")], "miou"),
    "data make-detection": (lambda c: ["data", "make-detection", "--out", str(c.tmp / "det"), "--data", c.idx,
                                       "--train-count", "8", "--val-count", "4", "--canvas", "32"], "train_instances"),
    "eval detect": (lambda c: ["eval", "detect", "--ckpt", str(c.run / "last.pt"), "--data", detection(c),
                               "--recipe", str(REPO / "configs/detect/maskrcnn_vit-mini_fmnist-canvas.yaml"),
                               "--steps", "2", "--set", "batch_size=2", "--set", "blocks=[1,2,3,4]", "--set",
                               "num_workers=0", "--out", str(c.tmp / "detrun")], "box_ap"),
    "bench": (lambda c: ["bench", "--config", MAE_RECIPE, "--batch", "2", "--steps", "1", "--warmup", "0",
                         "--modes", "eager", "model.size=pico"], None),
    "demo": (lambda c: ["demo", "--config", MAE_RECIPE, "--steps", "2", "--train-limit", "100", "--out",
                        str(c.tmp / "demo")], None),
}


def segmentation(c) -> str:
    from mimkit.data.segmentation import make_segmentation
    make_segmentation(c.tmp / "canvases", c.idx, canvas=32, train_count=8, val_count=4)
    return f"seg:{c.tmp / 'canvases'}"


def detection(c) -> str:
    from mimkit.data.detection import make_detection
    make_detection(c.tmp / "coco", c.idx, canvas=32, train_count=8, val_count=4)
    return f"coco:{c.tmp / 'coco'}"


def test_every_sub_command_has_a_route():
    assert leaf_commands(build_parser()) == set(ROUTES)


@pytest.fixture(scope="module")
def routes_context(fmnist_small, tmp_path_factory):
    """A 2-step pico MAE run and a 2-step tiny d-VAE run, both made through the CLI."""
    tmp = tmp_path_factory.mktemp("routes")
    run, tokenizer = tmp / "mae", tmp / "dvae"
    assert main(["pretrain", "--config", MAE_RECIPE, "--out", str(run), "--data", f"idx:{fmnist_small}",
                 "--steps", "2", *PICO]) == 0
    assert main(["tokenizer", "train", "--config", DVAE_RECIPE, "--out", str(tokenizer), "--data",
                 f"idx:{fmnist_small}", "--steps", "2", "data.num_workers=0", "train.sample_every=0"]) == 0
    return run, tokenizer


@pytest.mark.parametrize("command", sorted(ROUTES))
def test_route_runs_end_to_end(command, routes_context, fmnist_small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIMKIT_DATA_DIR", str(fmnist_small))              # the demo's default data: the small copy
    run, tokenizer = routes_context
    argv, key = ROUTES[command]
    argv = argv(Context(tmp_path, fmnist_small, run, tokenizer))
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if key is not None:
        result = json.loads(out.strip().splitlines()[-1])
        assert result[key] is not None, result
    elif command == "eval report":
        assert "| " in (tmp_path / "report" / "report.md").read_text()
    elif command == "bench":
        assert "GFLOP" in out or "FLOP" in out, out
    elif command == "demo":
        assert re.search(r"Stages finished: (\d) of \1", (tmp_path / "demo" / "report.md").read_text())
