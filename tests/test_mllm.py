"""LLaVA conversation format, splicing, LlavaModel, MLLMTask (stages, checkpoints, LoRA), data formats, the config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffperc.cli import cli_main
from diffperc.data.mllm import GQADataset, LlavaConversationDataset, MMVPDataset
from diffperc.mllm.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    VICUNA_SYSTEM,
    first_question,
    render,
    tokenize_conversation,
)
from diffperc.mllm.encoder import VisionEncoder
from diffperc.mllm.metrics import gqa_accuracy, mmvp_correct, mmvp_scores, parse_options
from diffperc.mllm.model import LlavaModel, splice, tiny_llama
from diffperc.mllm.towers import PixelPatchTower
from diffperc.tasks.mllm import MLLMTask

ROOT = Path(__file__).resolve().parents[1]
CONV = [{"from": "human", "value": "what is in the image ?\n<image>"}, {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "is it black ?"}, {"from": "gpt", "value": "no"}]
TINY = dict(backbone="test_sd", image_size=32, clip="test_clip", language_model="test_llama",
            cross_attention_heads=2, lm_train="lora", lora_r=4, lora_alpha=8)


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["diffperc"])


def _vicuna_get_prompt(messages):
    """Port of LLaVA conv_vicuna_v1.get_prompt (llava/conversation.py:34-62, SeparatorStyle.TWO) and of
    preprocess_multimodal's '<image>\\n' move (llava/train/train.py:318-321)."""
    seps = [" ", "</s>"]
    ret = VICUNA_SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        if "<image>" in message:
            message = "<image>\n" + message.replace("<image>", "").strip()
        ret += role + ": " + message + seps[i % 2]
    return ret


def test_vicuna_format_matches_llava_and_masks_all_but_answers():
    pieces = render(CONV, "vicuna_v1")
    roles = ["USER", "ASSISTANT", "USER", "ASSISTANT"]
    assert "".join(t for t, _ in pieces) == _vicuna_get_prompt([(r, c["value"]) for r, c in zip(roles, CONV, strict=True)])
    assert [t for t, trained in pieces if trained] == [" a cat</s>", " no</s>"]
    _, tok = tiny_llama("what is in the image cat black".split())
    ids, labels = tokenize_conversation(CONV, tok)
    assert ids[0] == tok.bos_token_id and (ids == IMAGE_TOKEN_INDEX).sum() == 1
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "a cat </s> no </s>"
    assert first_question(CONV) == "what is in the image ?"


def test_plain_format_trains_only_the_caption():
    _, tok = tiny_llama("a cat".split())
    conv = [{"from": "human", "value": "<image>\ndescribe it"}, {"from": "gpt", "value": "a cat"}]
    ids, labels = tokenize_conversation(conv, tok, "plain")
    assert ids.tolist()[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "a cat"
    with pytest.raises(ValueError, match="turn"):
        render([{"from": "human", "value": "x"}], "vicuna_v1")
    with pytest.raises(ValueError, match="format"):
        render(conv, "chatml")


def test_splice_puts_visual_tokens_at_the_placeholder():
    emb = torch.nn.Embedding(10, 3)
    ids = [torch.tensor([1, IMAGE_TOKEN_INDEX, 4, 5]), torch.tensor([1, 2, IMAGE_TOKEN_INDEX])]
    labels = [torch.tensor([-100, -100, 4, 5]), torch.tensor([-100, 2, -100])]
    vis = torch.randn(2, 2, 3)
    for left in (False, True):
        x, mask, lab = splice(ids, vis, emb, labels, pad_left=left)
        assert x.shape == (2, 5, 3) and mask.tolist() == ([[1] * 5, [1, 1, 1, 1, 0]] if not left
                                                           else [[1] * 5, [0, 1, 1, 1, 1]])
        o = 1 if left else 0
        assert torch.equal(x[0, 1:3], vis[0]) and torch.equal(x[1, o + 2 : o + 4], vis[1])
        assert torch.equal(x[0, 3], emb.weight[4]) and torch.equal(x[1, o + 1], emb.weight[2])
        assert lab[0].tolist() == [-100, -100, -100, 4, 5]
    with pytest.raises(ValueError, match="<image>"):
        splice([torch.tensor([1, 2])], vis[:1], emb)


def _toy_model():
    lm, tok = tiny_llama("yes no bright dark is it".split(), hidden_size=32)
    enc = VisionEncoder(32, PixelPatchTower(patch_size=8))
    return LlavaModel(enc, lm, tok)


def test_llava_model_learns_to_answer_from_the_image_and_batch_generation_is_consistent():
    torch.manual_seed(0)
    model = _toy_model()
    images = torch.stack([torch.full((3, 16, 16), 0.9), torch.full((3, 16, 16), 0.1)])
    convs = [[{"from": "human", "value": "<image>\nis it bright ?"}, {"from": "gpt", "value": a}] for a in ("yes", "no")]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(images, convs)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    assert model.generate(images, ["is it bright ?"] * 2, max_new_tokens=3) == ["yes", "no"]
    # left padding: a batch whose questions differ in length answers as each alone
    qs = ["is it bright ?", "is it bright ? is it"]
    both = model.generate(images, qs, max_new_tokens=3)
    assert both == [model.generate(images[i : i + 1], qs[i : i + 1], max_new_tokens=3)[0] for i in range(2)]


@pytest.fixture(scope="module")
def task():
    return MLLMTask(**TINY, guidance_scale=4.0, fusion="cross_attention", prompt_dropout=0.5)


def test_task_trains_projector_fusion_and_lora_only(task):
    trained = task._trained()
    assert trained and all(("projector" in n or "cross_attention" in n or "lora_" in n) for n in trained)
    assert any("lora_" in n for n in trained)
    assert set(task.state_dict()) == trained
    stage1 = MLLMTask(**{**TINY, "lm_train": "full"}, stage=1, fusion="concat_tokens")
    assert all("projector" in n for n in stage1._trained()) and stage1.model.fmt == "plain"


def test_diffusion_prompts_per_stage(task):
    convs = [CONV] * 200
    task.train()
    prompts = task.diffusion_prompts(convs)
    n_empty = sum(p == "" for p in prompts)
    assert 60 < n_empty < 140 and set(prompts) == {"", "what is in the image ?"}
    task.eval()
    assert task.diffusion_prompts(convs[:3]) == ["what is in the image ?"] * 3


def test_checkpoint_roundtrip_keeps_only_trained_weights(task, tmp_path):
    path = tmp_path / "m.ckpt"
    with torch.no_grad():
        task.model.encoder.cross_attention.gate.fill_(0.3)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    ckpt = torch.load(path, weights_only=True)
    assert not any("backbone" in k or "clip.model" in k for k in ckpt["state_dict"])
    n_saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_saved < 0.5 * sum(p.numel() for p in task.parameters())
    fresh = MLLMTask(**TINY, guidance_scale=4.0, fusion="cross_attention")
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.model.encoder.cross_attention.gate.item() == pytest.approx(0.3)
    del ckpt["state_dict"]["model.encoder.cross_attention.gate"]
    with pytest.raises(KeyError, match="gate"):
        fresh.on_load_checkpoint(ckpt)


# ---------------------------------------------------------------------------- formats
def _img(path: Path, seed: int, size=(40, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_llava(root: Path, n: int = 4) -> Path:
    items = [{"id": str(i), "image": f"imgs/{i}.jpg",
              "conversations": [{"from": "human", "value": "<image>\nwhat is in the image ?"},
                                {"from": "gpt", "value": "a photo of digit"}]} for i in range(n)]
    items.append({"id": "text", "conversations": CONV})  # text-only: skipped
    for i in range(n):
        _img(root / "imgs" / f"{i}.jpg", i)
    (root / "llava.json").write_text(json.dumps(items))
    return root / "llava.json"


def make_mmvp(root: Path) -> Path:
    rows = [("1", "Is the door open?", "(a) Open (b) Closed", "(a)"), ("2", "Is the door open?", "(a) Open (b) Closed", "(b)"),
            ("3", "Which way?", "(a) Left (b) Right", "(b)"), ("4", "Which way?", "(a) Left (b) Right", "(a)")]
    with open(root / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerows(rows)
    for r in rows:
        _img(root / "MMVP Images" / f"{r[0]}.jpg", int(r[0]))
    return root


def make_gqa(root: Path) -> Path:
    qs = {"20968": {"imageId": "n1", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No."},
          "20969": {"imageId": "n2", "question": "What color is the car?", "answer": "red", "fullAnswer": "Red."}}
    (root / "questions1.2").mkdir(parents=True)
    (root / "questions1.2" / "testdev_balanced_questions.json").write_text(json.dumps(qs))
    for q in qs.values():
        _img(root / "images" / f"{q['imageId']}.jpg", 7)
    return root


def test_datasets_read_the_released_formats(tmp_path):
    ds = LlavaConversationDataset(make_llava(tmp_path), tmp_path, image_size=32)
    assert len(ds) == 4 and ds.skipped_text_only == 1
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["image"][:, 0, 16].tolist() == pytest.approx([122 / 255, 116 / 255, 104 / 255], abs=0.03)  # square pad
    (tmp_path / "mmvp").mkdir()
    mm = MMVPDataset(make_mmvp(tmp_path / "mmvp"), image_size=32)
    assert mm[1]["question"] == "Is the door open? (a) Open (b) Closed" and mm[1]["answer"] == "(b)"
    assert mm[1]["question_id"] == 2
    gqa = GQADataset(make_gqa(tmp_path / "gqa"), image_size=32)
    assert gqa[0]["question"].startswith("Is it overcast?\nAnswer the question using a single word")
    with pytest.raises(FileNotFoundError, match="Questions.csv"):
        MMVPDataset(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="testdev_balanced_questions.json"):
        GQADataset(tmp_path)


def test_mmvp_is_scored_per_pair():
    opts = "(a) Open (b) Closed"
    assert parse_options(opts) == ["Open", "Closed"]
    assert mmvp_correct("(a)", opts, "(a)") and mmvp_correct("A. Open", opts, "(a)")
    assert mmvp_correct("The door is closed.", opts, "(b)") and not mmvp_correct("(b) Closed", opts, "(a)")
    assert not mmvp_correct("open or closed", opts, "(a)")  # names both options: wrong
    recs = [{"question_id": i, "correct": c} for i, c in zip(range(1, 7), [1, 1, 1, 0, 0, 1], strict=True)]
    s = mmvp_scores(recs)
    assert s["pair_accuracy"] == pytest.approx(1 / 3) and s["question_accuracy"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="pair"):
        mmvp_scores(recs[:5])
    assert gqa_accuracy([{"response": "Red.", "answer": "red"}, {"response": "blue", "answer": "red"}]) == 0.5


def test_config_fits_and_tests_on_tiny_models(tmp_path):
    config = ROOT / "configs/mllm/llava_mustafar_sd21.yaml"
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    make_llava(tmp_path)
    (tmp_path / "mmvp").mkdir()
    make_mmvp(tmp_path / "mmvp")
    tiny = [f"--model.init_args.{k}={v}" for k, v in TINY.items()]
    common = ["--config", str(config), *tiny, "--trainer.accelerator=cpu", "--trainer.precision=32",
              "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}", "--data.init_args.image_size=32",
              "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]
    cli = cli_main(["fit", *common, "--trainer.fast_dev_run=1", f"--data.init_args.train_json={tmp_path}/llava.json",
                    f"--data.init_args.image_folder={tmp_path}"])
    assert cli.model.model.encoder.clip is not None and cli.model.hparams.guidance_scale == 4.0
    cli = cli_main(["test", *common, "--data.init_args.benchmark=mmvp", f"--data.init_args.benchmark_root={tmp_path}/mmvp",
                    "--model.init_args.max_new_tokens=2", f"--model.init_args.answers_dir={tmp_path}/ans"])
    lines = (tmp_path / "ans" / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["prompt"] == "Is the door open? (a) Open (b) Closed"
    scores = json.loads((tmp_path / "ans" / "scores.json").read_text())
    assert scores["pairs"] == 2 and cli.trainer.callback_metrics["test/pair_accuracy"].item() == scores["pair_accuracy"]
