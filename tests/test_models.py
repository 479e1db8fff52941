"""Model/tokenizer loading rules: presets, pad tokens, dropout, atomic HF export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from rlhf_lightning.models import (
    PAD_TOKEN,
    ModelLoadError,
    byte_tokenizer,
    is_complete_hf_folder,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    save_hf_folder,
)


def test_tokenizer_without_pad_gets_a_distinct_pad_and_model_grows(bpe_gpt2_dir: Path):
    tokenizer = load_tokenizer(str(bpe_gpt2_dir))
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_causal_lm(str(bpe_gpt2_dir), tokenizer)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_existing_pad_token_is_kept(byte_gpt2_dir: Path):
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)


def test_preset_needs_no_download_and_has_no_dropout():
    tokenizer = load_tokenizer("preset:tiny-gpt2")
    model = load_causal_lm("preset:tiny-gpt2", tokenizer)
    assert model.config.vocab_size >= len(tokenizer) == 384
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0
    with pytest.raises(ModelLoadError, match="unknown preset"):
        load_tokenizer("preset:nope")


@pytest.mark.parametrize("fixture", ["byte_gpt2_dir", "llama_dir"])
def test_export_then_reload_gives_same_logits(request, tmp_path: Path, fixture: str):
    source = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(str(source))
    model = load_causal_lm(str(source), tokenizer).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = save_hf_folder(tmp_path / "export", model, tokenizer)
    assert is_complete_hf_folder(out)
    reloaded_tokenizer = load_tokenizer(str(out))
    reloaded = load_causal_lm(str(out), reloaded_tokenizer).eval()
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_export_replaces_folder_atomically(tmp_path: Path, byte_gpt2_dir: Path):
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    model = load_causal_lm(str(byte_gpt2_dir), tokenizer)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old run")
    save_hf_folder(target, model, tokenizer)
    assert not (target / "stale.txt").exists() and is_complete_hf_folder(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["byte-gpt2", "out"]  # no temporary leftovers


def test_half_written_folder_is_not_complete(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete_hf_folder(tmp_path)


def test_missing_folder_and_missing_tokenizer_are_clear(tmp_path: Path, byte_gpt2_dir: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    for name in ("tokenizer_config.json", "added_tokens.json", "chat_template.jinja"):
        (byte_gpt2_dir / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(str(byte_gpt2_dir))


@pytest.mark.parametrize("config_class", [Qwen2Config, LlamaConfig])
def test_byte_tokenizer_round_trips_whatever_the_model_config(tmp_path: Path, config_class):
    # For a qwen2 config.json, AutoTokenizer loads Qwen2Tokenizer whatever tokenizer_config.json
    # names; with no tokenizer.json to read, it encoded every text to no ids.
    tokenizer = byte_tokenizer()
    config = config_class(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=32)
    folder = save_hf_folder(tmp_path / "export", AutoModelForCausalLM.from_config(config), tokenizer)
    reloaded = load_tokenizer(str(folder))
    text = "héllo, <|user|> world"
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert ids and ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == text
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 1)
    assert reloaded.chat_template == tokenizer.chat_template


def test_tokenizer_that_encodes_text_to_nothing_is_refused(tmp_path: Path):
    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="</s>")
    folder = save_hf_folder(tmp_path / "empty-vocab", None, empty)
    with pytest.raises(ModelLoadError, match=f"'{folder}'.*no ids"):
        load_tokenizer(str(folder))


def test_sequence_scorer_from_causal_lm_folder(llama_dir: Path):
    tokenizer = load_tokenizer(str(llama_dir))
    scorer = load_sequence_scorer(str(llama_dir), tokenizer)
    assert scorer.config.num_labels == 1
    assert scorer(torch.tensor([[3, 4, 5]])).logits.shape == (1, 1)


def test_every_dropout_module_is_off_whatever_the_config_calls_it(tmp_path: Path, monkeypatch):
    """A dropout the config-attribute list does not know (simulated by emptying the list) is still
    off: two training-mode forwards give the same logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import rlhf_lightning.models as models

    tokenizer = load_tokenizer("preset:tiny-gpt2")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5,
                        attn_pdrop=0.5)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(models, "DROPOUT_ATTRIBUTES", ())
    model = load_causal_lm(str(tmp_path / "m"), tokenizer).train()
    assert model.config.resid_pdrop == 0.5  # the config still says 0.5 ...
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)  # ... but every dropout module is off
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(model(ids).logits, model(ids).logits)
