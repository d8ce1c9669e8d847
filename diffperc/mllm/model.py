"""A LLaVA-style multimodal model: a :class:`VisionEncoder` whose tokens are spliced into a causal LM.

LLaVA (Liu et al., "Improved Baselines with Visual Instruction Tuning", CVPR 2024, arXiv 2310.03744;
github haotian-liu/LLaVA) replaces each ``<image>`` placeholder (id -200) by the projected visual
tokens (``prepare_inputs_labels_for_multimodal`` in llava/model/llava_arch.py); the labels of the
visual tokens are -100. Here the splice is :func:`splice`; sequences are right-padded for training
and left-padded for generation.

The language model is any Hugging Face causal LM (``AutoModelForCausalLM``) by hub id or folder,
or ``"test_llama"``: a tiny random Llama with a word-level tokenizer built in code (offline tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    generation_prompt,
    tokenize_conversation,
    tokenize_pieces,
)

__all__ = ["LlavaModel", "apply_lora", "load_language_model", "splice", "tiny_llama", "word_tokenizer"]

_BASE_WORDS = ("a chat between curious user and an artificial intelligence assistant the gives helpful detailed "
               "polite answers to user's questions USER ASSISTANT : . , ? ' s \n yes no").split(" ")


def word_tokenizer(words: Sequence[str] = ()) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (``<s>``, ``</s>``, ``<pad>``, ``<unk>`` + words), offline.

    Text is split on whitespace and punctuation; LLaVA's system prompt words are always included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab: dict[str, int] = {w: i for i, w in enumerate(special)}
    for w in [*_BASE_WORDS, *words]:
        for piece in pre_tokenizers.Whitespace().pre_tokenize_str(w):
            vocab.setdefault(piece[0], len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(words: Sequence[str] = (), hidden_size: int = 32, layers: int = 2, heads: int = 4,
               seed: int = 0) -> tuple[nn.Module, Any]:
    """A tiny random ``LlamaForCausalLM`` and its word-level tokenizer (offline tests, the digits check)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(words)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = LlamaForCausalLM(cfg)
    return lm, tok


def load_language_model(name_or_path: str, torch_dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a causal LM: ``"test_llama"`` or a hub id / folder (offline with HF_HUB_OFFLINE=1)."""
    if name_or_path == "test_llama":
        return tiny_llama(words="what is in the image describe it photo of digit".split())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..backbones._loading import is_offline

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=is_offline())
        lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, local_files_only=is_offline())
    except OSError as err:
        raise OSError(f"could not load the language model {name_or_path!r}: download it once where the Hub is "
                      f"reachable (`hf download {name_or_path}`), then run with HF_HUB_OFFLINE=1, or pass a local "
                      "folder; offline tests use 'test_llama'") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token  # LLaVA-1.5 pads with unk
    return lm, tok


def apply_lora(lm: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.05,
               target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")) -> nn.Module:
    """Wrap the LM with peft LoRA adapters (LLaVA-1.5's LoRA run uses r=128, alpha=256 on all linears)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'diffperc[mllm]' (or pip install peft)") from err
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in target_modules if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA target_modules {list(target_modules)} is a Linear of this LM; "
                         f"its Linear names: {sorted(names)}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(lm, cfg)


def splice(input_ids: Sequence[Tensor], image_tokens: Tensor, embed: nn.Module, labels: Sequence[Tensor] | None = None,
           pad_left: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Replace each sample's ``<image>`` placeholder by its visual tokens and pad the batch.

    Args:
        input_ids: B sequences (T_i,) with exactly one IMAGE_TOKEN_INDEX each.
        image_tokens: (B, N, D) visual tokens, already projected.
        embed: the LM's input embedding.
        labels: B label sequences (T_i,) or None; visual tokens get -100.
        pad_left: left padding (generation) instead of right padding (training).

    Returns:
        inputs_embeds (B, T, D), attention_mask (B, T) long, labels (B, T) or None.
    """
    if len(input_ids) != image_tokens.shape[0]:
        raise ValueError(f"{len(input_ids)} sequences but {image_tokens.shape[0]} images")
    embeds, labs = [], []
    n = image_tokens.shape[1]
    for i, ids in enumerate(input_ids):
        where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        if len(where) != 1:
            raise ValueError(f"sequence {i} has {len(where)} <image> tokens; one image per sample is supported")
        k = int(where[0])
        text = embed(ids.clamp(min=0).to(image_tokens.device))  # (T_i, D)
        embeds.append(torch.cat([text[:k], image_tokens[i].to(text.dtype), text[k + 1 :]]))
        if labels is not None:
            fill = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
            labs.append(torch.cat([labels[i][:k], fill, labels[i][k + 1 :]]))
    t = max(len(e) for e in embeds)
    b, d = len(embeds), embeds[0].shape[1]
    out = embeds[0].new_zeros(b, t, d)
    mask = torch.zeros(b, t, dtype=torch.long, device=out.device)
    lab = torch.full((b, t), IGNORE_INDEX, dtype=torch.long, device=out.device) if labels is not None else None
    for i, e in enumerate(embeds):
        sl = slice(t - len(e), t) if pad_left else slice(0, len(e))
        out[i, sl], mask[i, sl] = e, 1
        if lab is not None:
            lab[i, sl] = labs[i].to(out.device)
    return out, mask, lab


class LlavaModel(nn.Module):
    """Vision encoder + causal LM, LLaVA style.

    Args:
        encoder: a :class:`~diffperc.mllm.encoder.VisionEncoder` whose ``hidden_size`` is the LM's.
        lm: a Hugging Face causal LM (optionally wrapped by peft).
        tokenizer: its tokenizer.
        fmt: conversation format of training text, ``"plain"`` (stage 1) or ``"vicuna_v1"``.
    """

    def __init__(self, encoder: nn.Module, lm: nn.Module, tokenizer: Any, fmt: str = "vicuna_v1") -> None:
        super().__init__()
        self.encoder, self.lm, self.tokenizer, self.fmt = encoder, lm, tokenizer, fmt

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def encode_images(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D) visual tokens in the LM's embedding dtype."""
        dtype = self.lm.get_input_embeddings().weight.dtype
        return self.encoder(images, prompts, generator=generator).to(dtype)

    def forward(self, images: Tensor | None, conversations: Sequence[Sequence[dict[str, str]]],
                prompts: str | Sequence[str] | None = None, image_tokens: Tensor | None = None) -> Tensor:
        """The LM loss (mean over trained tokens) of B conversations on B images.

        ``image_tokens`` (B, N, D) may replace ``images`` (precomputed visual tokens).
        """
        pairs = [tokenize_conversation(c, self.tokenizer, self.fmt) for c in conversations]
        tokens = image_tokens if image_tokens is not None else self.encode_images(images, prompts)
        embeds, mask, labels = splice([p[0] for p in pairs], tokens, self.lm.get_input_embeddings(),
                                      [p[1] for p in pairs])
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, images: Tensor | None, questions: Sequence[str], prompts: str | Sequence[str] | None = None,
                 max_new_tokens: int = 32, image_tokens: Tensor | None = None, fmt: str | None = None) -> list[str]:
        """Greedy answers (LLaVA-1.5 evaluates at temperature 0) to B questions, one per image."""
        fmt = fmt or self.fmt
        ids = [tokenize_pieces([(generation_prompt(q, fmt), False)], self.tokenizer)[0] for q in questions]
        tokens = image_tokens if image_tokens is not None else self.encode_images(images, prompts)
        embeds, mask, _ = splice(ids, tokens, self.lm.get_input_embeddings(), pad_left=True)
        tok = self.tokenizer
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts]
