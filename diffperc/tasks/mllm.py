"""LLaVA-1.5 training and evaluation with question-conditioned diffusion features (Mustafar).

Two stages, as LLaVA-1.5 (arXiv 2310.03744; scripts/v1_5/pretrain.sh, finetune.sh):

1. ``stage=1`` projector pre-training on image-caption pairs (``"plain"`` format): LLM and towers
   frozen, only the projector (and fusion) trained; the diffusion tower gets **no prompt**
   (Mustafar pre-trains without one, which keeps the LLM from learning to read the prompt back).
2. ``stage=2`` instruction tuning (``"vicuna_v1"``): the question (first human turn) is the
   diffusion prompt, replaced by the empty prompt with probability ``prompt_dropout``; the LLM is
   trained fully (LLaVA-1.5), through LoRA adapters (``lm_train="lora"``) or kept frozen.

Evaluation (``test``/``predict``) generates greedy answers with the question as the prompt and
scores them as the benchmark does (MMVP per pair, GQA exact match); answers are written as JSONL.
Checkpoints hold only what was trained (projector, fusion, LoRA adapters; the LLM only when
``lm_train="full"``); everything frozen is rebuilt from the hyperparameters.

    diffperc fit --config configs/mllm/llava_mustafar_sd21.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from .._io import write_text_atomic
from ..mllm.conversation import first_question
from ..mllm.encoder import VisionEncoder
from ..mllm.metrics import gqa_accuracy, mmvp_correct, mmvp_scores
from ..mllm.model import LlavaModel, apply_lora, load_language_model
from ..mllm.towers import MUSTAFAR_TAP, CLIPTower, DiffusionTower, tiny_clip_vision_config

__all__ = ["MLLMTask"]


def _clip(name: str | None) -> CLIPTower | None:
    if name is None:
        return None
    return CLIPTower(tiny_clip_vision_config() if name == "test_clip" else name)


class MLLMTask(LightningModule):
    """A LLaVA-style MLLM whose visual tokens come from a diffusion backbone (+ optional CLIP).

    Args:
        backbone: diffperc backbone preset or folder (``"sd21"``, ``"digits"``, ``"test_sd"``).
        layer, timestep, guidance_scale, image_size, pool, backbone_kwargs: see
            :class:`~diffperc.mllm.towers.DiffusionTower` (Mustafar: the ``to_q`` tap, t=50, s=4, 512).
        clip: ``CLIPVisionModel`` id/folder to fuse (``"openai/clip-vit-large-patch14-336"``),
            ``"test_clip"`` (tiny random), or None (diffusion tokens only).
        fusion, projector, cross_attention_query, cross_attention_heads: see
            :class:`~diffperc.mllm.encoder.VisionEncoder`.
        language_model: causal LM hub id / folder (``"lmsys/vicuna-7b-v1.5"``) or ``"test_llama"``.
        stage: 1 (projector pre-training, no prompt) or 2 (instruction tuning, question prompts).
        prompt_dropout: stage 2: probability that a sample's diffusion prompt is replaced by "".
        lm_train: ``"frozen"``, ``"lora"`` or ``"full"`` (stage 1 always freezes the LLM).
        lora_r, lora_alpha, lora_dropout: LoRA options (``lm_train="lora"``).
        init_from: a stage-1 checkpoint whose projector/fusion weights start stage 2.
        max_new_tokens: generation length at evaluation.
        answers_dir: where test answers (JSONL) and scores (JSON) are written; None: not written.
        optimizer: called with the trainable parameters (LLaVA-1.5: AdamW, lr 1e-3 stage 1, 2e-5 stage 2).
    """

    def __init__(
        self, backbone: str = "sd21", layer: str = MUSTAFAR_TAP, timestep: int = 50, guidance_scale: float = 4.0,
        image_size: int | None = 512, pool: int = 1, backbone_kwargs: dict[str, Any] | None = None,
        clip: str | None = "openai/clip-vit-large-patch14-336", fusion: str = "cross_attention",
        projector: str = "mlp2x_gelu", cross_attention_query: str = "clip", cross_attention_heads: int = 8,
        language_model: str = "lmsys/vicuna-7b-v1.5", stage: int = 2, prompt_dropout: float = 0.0,
        lm_train: str = "full", lora_r: int = 128, lora_alpha: int = 256, lora_dropout: float = 0.05,
        init_from: str | None = None, max_new_tokens: int = 32, answers_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (projector pre-training) or 2 (instruction tuning), got {stage}")
        if lm_train not in ("frozen", "lora", "full"):
            raise ValueError(f"lm_train must be 'frozen', 'lora' or 'full', got {lm_train!r}")
        if not 0 <= prompt_dropout <= 1:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        tower = DiffusionTower(backbone, layer, timestep, guidance_scale, image_size, pool, backbone_kwargs)
        lm, tokenizer = load_language_model(language_model)
        encoder = VisionEncoder(lm.config.hidden_size, tower, _clip(clip), fusion, projector, cross_attention_query,
                                cross_attention_heads)
        lm.requires_grad_(False)
        if stage == 2 and lm_train == "lora":
            lm = apply_lora(lm, lora_r, lora_alpha, lora_dropout)
        elif stage == 2 and lm_train == "full":
            lm.requires_grad_(True)
        self.model = LlavaModel(encoder, lm, tokenizer, "plain" if stage == 1 else "vicuna_v1")
        self.stage, self.prompt_dropout = stage, prompt_dropout
        self.strict_loading = False
        self._records: list[dict[str, Any]] = []
        if init_from:
            self._init_from(init_from)

    # ------------------------------------------------------------------ checkpoints (trained weights only)
    def _trained(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, destination: dict[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """Only the trained parameters (projector, fusion, adapters, a fully tuned LLM)."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n in self._trained()}
        for key in [k for k in state if k not in keep]:
            del state[key]
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check every trained weight is there, then fill the frozen ones from the rebuilt model."""
        state = checkpoint.setdefault("state_dict", {})
        missing = sorted(self._trained() - set(state))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained weights of this MLLMTask: {missing[:6]}. "
                           "Was it saved with other fusion/projector/lm_train/stage settings?")
        full = super().state_dict()
        state.update({k: v for k, v in full.items() if k not in state})

    def _init_from(self, path: str) -> None:
        """Start from a stage-1 checkpoint's projector and fusion weights (LLaVA's pretrain_mm_mlp_adapter)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in ckpt.get("state_dict", ckpt).items() if ".encoder." in f".{k}"}
        if not state:
            raise ValueError(f"{path} holds no encoder (projector/fusion) weights: is it a stage-1 MLLMTask checkpoint?")
        missing = self.load_state_dict(state, strict=False).unexpected_keys
        if missing:
            raise ValueError(f"{path} has weights this model lacks: {missing[:6]} (other fusion/projector?)")

    # ------------------------------------------------------------------ steps
    def diffusion_prompts(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """Stage 1: all empty. Stage 2: each first question, dropped to "" with ``prompt_dropout`` in training."""
        if self.stage == 1:
            return [""] * len(conversations)
        prompts = [first_question(c) for c in conversations]
        if self.training and self.prompt_dropout > 0:
            drop = torch.rand(len(prompts)) < self.prompt_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        return prompts

    def _loss(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        convs = batch["conversations"]
        loss = self.model(batch["image"], convs, self.diffusion_prompts(convs))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(convs))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "val")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy answers with the questions as diffusion prompts (Mustafar's evaluation)."""
        questions = batch["question"]
        prompts = [""] * len(questions) if self.stage == 1 else list(questions)
        answers = self.model.generate(batch["image"], questions, prompts, self.hparams.max_new_tokens, fmt="vicuna_v1")
        recs = []
        for i, response in enumerate(answers):
            rec = {"question_id": batch["question_id"][i], "prompt": questions[i], "answer": batch["answer"][i],
                   "response": response, "benchmark": batch["benchmark"][i]}
            if rec["benchmark"] == "mmvp":
                rec["correct"] = mmvp_correct(response, batch["options"][i], rec["answer"])
            recs.append(rec)
        return recs

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._records.extend(self.predict_step(batch, batch_idx))

    def on_test_epoch_start(self) -> None:
        self._records = []

    def on_test_epoch_end(self) -> None:
        scores = self.score(self._records)
        for k, v in scores.items():
            self.log(f"test/{k}", v)
        if self.hparams.answers_dir:
            out = Path(self.hparams.answers_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in self._records))
            write_text_atomic(out / "scores.json", json.dumps(scores, indent=2))

    @staticmethod
    def score(records: list[dict[str, Any]]) -> dict[str, float]:
        """Benchmark metrics of answer records (MMVP: per pair and per question; GQA: accuracy)."""
        kinds = {r["benchmark"] for r in records}
        if kinds == {"mmvp"}:
            return mmvp_scores(records)
        if kinds == {"gqa"}:
            return {"accuracy": gqa_accuracy(records)}
        raise ValueError(f"records must all come from one benchmark (mmvp or gqa), got {sorted(kinds)}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("MLLMTask has no trainable parameters")
        return self.optimizer(params)
