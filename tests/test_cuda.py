"""The tak layer on a CUDA device gives what it gives on the CPU (GPU only: ``pytest -m gpu``).

Each test runs the same work on the CPU (the torch backend) and on the GPU (the automatic backend:
compiled Triton kernels) and compares them:
- KFAC and EK-FAC factors, and their quadratic forms with gradients, of an open_clip CLIP, a BERT encoder
  with padding and T5 (Monte-Carlo probes are drawn on the CPU, so both devices use the same ones; EK-FAC
  takes the CPU's KFAC eigenbases on both);
- ``tak.train`` of every method on a tiny BERT and of the demo's methods on a tiny CLIP image tower;
- an evaluation sweep on the GPU with the frozen-prefix replay against one without.
Models have random weights and are built from configs, fp32 at 'highest' precision, without dropout,
so that both devices compute the same function up to rounding (sums in another order: factors and
forms agree to 1e-4); nothing beyond open_clip and transformers is needed.
"""
import copy
import dataclasses
import json

import pytest
import torch
from torch.utils import _pytree as pytree

import tak
from tak.arithmetic.compose import Evaluator
from tak.backbones import load_backbone
from tak.curvature import KFAC, LayerFactors, fit_ekfac, fit_kfac
from tak.data import Task, register_task
from tak.data.registry import _TASKS
from tak.methods import METHODS, CurvaturePenalty
from tak.task_vector import TaskVector
from tak.training import TrainConfig, fit, loop
from tak.training import factors as training_factors

from .test_fit_kfac import random_mask, tiny_clip
from .test_methods import factor_tensors, toy_factor_kinds
from .test_tak_models import text_batch
from .util import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]  # under xdist: 8 workers, not 8 × 16 threads
transformers = pytest.importorskip("transformers")

CUDA = torch.device("cuda")
WORDS = ["good", "bad", "great", "awful", "movie", "film", "plot", "actor", "red", "blue", "green", "cat", "dog",
         "the", "a", "is", "was", "very", "not", "sports", "cooking", "music", "news"]


# --- curvature ------------------------------------------------------------------------------------------

def bert_config(vocab_size: int):
    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def clip_case():
    torch.manual_seed(0)
    return tiny_clip().eval(), [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]


def bert_case():
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config(41)).eval()
    return model, [text_batch(41), text_batch(41, B=2, L=6, lengths=(6, 3))]


def t5_case():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    batches = []
    for n, t in [(3, 7), (2, 5)]:
        mask = random_mask(n, t)
        batches.append({"input_ids": torch.randint(1, 64, (n, t)).masked_fill(~mask, 0),
                        "attention_mask": mask.long()})
    return model, batches


def check_forms(factors, factors_gpu, model):
    """The quadratic form over every parameter of ``model`` and its τ-gradient agree across devices."""
    g = torch.Generator().manual_seed(3)
    taus = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    taus = {n: t.requires_grad_() for n, t in taus.items()}
    taus_gpu = {n: t.detach().to(CUDA).requires_grad_() for n, t in taus.items()}
    form, form_gpu = factors.quadratic_form(taus), factors_gpu.quadratic_form(taus_gpu)
    assert form_gpu.device.type == "cuda" and rel_err(form_gpu, form) < 1e-4
    form.backward()
    form_gpu.backward()
    used = [n for n, t in taus.items() if t.grad is not None]
    assert used and all(taus_gpu[n].grad is not None for n in used)
    assert rel_err(torch.cat([taus_gpu[n].grad.reshape(-1).cpu() for n in used]),
                   torch.cat([taus[n].grad.reshape(-1) for n in used])) < 1e-4


@pytest.mark.parametrize("case", [clip_case, bert_case, t5_case], ids=["clip", "bert", "t5"])
def test_kfac_and_ekfac_on_cuda_equal_cpu(case):
    model, batches = case()
    model_gpu = copy.deepcopy(model).to(CUDA)
    kfac = fit_kfac(model, batches, seed=1, progress=False)  # dense blocks (LayerNorms, class token) too
    kfac_gpu = fit_kfac(model_gpu, batches, seed=1, progress=False)
    assert list(kfac_gpu) == list(kfac) and kfac_gpu.meta["n_rows"] == kfac.meta["n_rows"]
    for name in kfac:
        for side in ("A", "B"):
            cpu, gpu = getattr(kfac[name], side), getattr(kfac_gpu[name], side)
            assert gpu.device.type == "cuda" and torch.equal(gpu, gpu.T), (name, side)
            assert rel_err(gpu, cpu) < 1e-4, (name, side)
    check_forms(kfac, kfac_gpu, model)

    layers = [n for n, f in kfac.factors.items() if hasattr(f, "weight")]  # linear layers (EK-FAC has no dense blocks)
    ekfac = fit_ekfac(model, batches, kfac=kfac, layers=layers, seed=2, progress=False)
    ekfac_gpu = fit_ekfac(model_gpu, batches, kfac=kfac, layers=layers, seed=2, progress=False)
    assert list(ekfac_gpu) == list(ekfac)
    for name in ekfac:
        assert rel_err(ekfac_gpu[name].S, ekfac[name].S) < 1e-4, name
    check_forms(ekfac, ekfac_gpu, model)


@pytest.mark.parametrize("options", [{"mc_samples": 3}, {"exact": True}], ids=["mc3", "exact"])
def test_batched_probes_on_cuda_equal_cpu(options):
    """Several cotangents per example go through one vmapped backward, here through CUDA's attention kernels."""
    model, batches = bert_case()
    kfac = fit_kfac(model, batches, seed=1, progress=False, **options)
    kfac_gpu = fit_kfac(copy.deepcopy(model).to(CUDA), batches, seed=1, progress=False, **options)
    assert list(kfac_gpu) == list(kfac)
    for name in kfac:
        for side in ("A", "B"):
            assert rel_err(getattr(kfac_gpu[name], side), getattr(kfac[name], side)) < 1e-4, (name, side)


# --- training and evaluation ------------------------------------------------------------------------------

TEXT_TASKS = ["cuda-text-a", "cuda-text-b", "cuda-text-ref"]
IMAGE_TASKS = ["cuda-image-a", "cuda-image-b", "cuda-image-ref"]


def text_task(name: str, seed: int) -> Task:
    """Sentences of random words, labelled by which of two words comes first: 48 train, 16 val, 16 test."""
    g = torch.Generator().manual_seed(seed)
    a, b = WORDS[seed % 4], WORDS[4 + seed % 4]
    examples = []
    for i in range(80):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (6,), generator=g)]
        first, second = (a, b) if i % 2 else (b, a)
        words[int(torch.randint(3, (1,), generator=g))] = first
        examples.append((" ".join(words + [second]), int(first == a)))
    return Task(name, [a, b], "text", ["{}", "a {} one"],
                {"train": lambda: examples[:48], "val": lambda: examples[48:64], "test": lambda: examples[64:]})


def image_task(name: str, seed: int) -> Task:
    """Random 40 × 30 images, labelled by their brightest colour channel: 48 train, 16 val, 16 test."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    arrays = torch.randint(0, 256, (80, 40, 30, 3), generator=g, dtype=torch.uint8)
    labels = arrays.float().mean((1, 2)).argmax(1).tolist()
    examples = [(Image.fromarray(x.numpy()), y) for x, y in zip(arrays, labels)]
    return Task(name, ["red", "green", "blue"], "image", ["a photo of a {} thing."],
                {"train": lambda: examples[:48], "val": lambda: examples[48:64], "test": lambda: examples[64:]})


@pytest.fixture(scope="module")
def registered():
    """The tasks above registered by name for the module, unregistered afterwards."""
    for i, name in enumerate(TEXT_TASKS):
        register_task(name, lambda root, seed=0, i=i, name=name, **kw: text_task(name, i), "test: random sentences")
    for i, name in enumerate(IMAGE_TASKS):
        register_task(name, lambda root, seed=0, i=i, name=name, **kw: image_task(name, i), "test: random images")
    yield
    for name in TEXT_TASKS + IMAGE_TASKS:
        _TASKS.pop(name, None)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """{"bert": "hf:<folder>", "clip": "clip:local-dir:<folder>"}: tiny random models saved as their
    libraries save them (a word-level BERT tokenizer over WORDS; open_clip's own BPE)."""
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    root = tmp_path_factory.mktemp("backbones")
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                               "[MASK]", *WORDS])})
    torch.manual_seed(0)
    transformers.BertModel(bert_config(len(tokenizer))).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    (root / "clip").mkdir()
    vision = {"image_size": 32, "layers": 2, "width": 24, "patch_size": 8, "head_width": 8}
    text = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
    (root / "clip" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 12, "vision_cfg": vision, "text_cfg": text}}))
    yield {"bert": f"hf:{root / 'bert'}", "clip": f"clip:local-dir:{root / 'clip'}"}
    for key in [k for k in loop._CACHE if str(root) in k[0]]:
        del loop._CACHE[key]


def config(spec: str, method: str, out, device: str) -> TrainConfig:
    tasks, trainable = (IMAGE_TASKS, "transformer.resblocks.1.*") if spec.startswith("clip") else \
        (TEXT_TASKS, "encoder.layer.1.*")
    return TrainConfig(method=method, task=tasks[0], tasks=tasks[:2], reference=tasks[2:], backbone=spec,
                       out=str(out / device), steps=3, batch_size=8, max_length=16, factor_examples=8,
                       trainable=trainable, lr=1e-3, eval_batch_size=16, seed=0, device=device, progress=False)


CLIP_METHODS = ["nonlinear", "linear", "tak", "delta"]


@pytest.mark.parametrize("backbone, method", [("bert", m) for m in METHODS] + [("clip", m) for m in CLIP_METHODS])
def test_training_on_cuda_equals_cpu(backbone, method, specs, registered, tmp_path):
    """Three steps of every method: the task vector (and a DELTA teacher's), the last loss terms and the
    accuracies agree.
    AdamW's first steps are about lr · sign(gradient), so a gradient that is zero up to rounding moves its
    entry differently on each device: τ agrees to 1e-3, not to rounding."""
    results = {device: tak.train(config(specs[backbone], method, tmp_path, device)) for device in ("cpu", "cuda")}
    pairs = [(results["cpu"].task_vector, results["cuda"].task_vector)]
    teachers = [r.path.parent / "teacher_task_vector.safetensors" for r in results.values()]
    if teachers[0].exists():
        pairs.append(tuple(TaskVector.load(path) for path in teachers))
    for cpu, gpu in pairs:
        assert set(gpu.tensors) == set(cpu.tensors) and all(t.device.type == "cpu" for t in gpu.tensors.values())
        names = sorted(cpu.tensors)
        tau, tau_gpu = (torch.cat([t.tensors[n].reshape(-1) for n in names]) for t in (cpu, gpu))
        assert tau.abs().sum() > 0 and rel_err(tau_gpu, tau) < 1e-3
    metrics, metrics_gpu = results["cpu"].metrics, results["cuda"].metrics
    assert set(metrics_gpu) == set(metrics)
    for key in {"val", "test", "teacher_test"} & set(metrics):  # accuracies (%): one of 16 examples apart at most
        assert abs(metrics_gpu[key] - metrics[key]) <= 100 / 16 + 1e-9, key
    for key, value in metrics["final_loss_terms"].items():
        assert metrics_gpu["final_loss_terms"][key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


def test_offloaded_factors_are_pinned_and_their_copies_equal_the_resident_factors():
    """Offloaded factors wait in pinned memory; each penalty step copies them on a stream of their own, which the
    penalty's kernels wait for: every kind gives the value and τ-gradient of factors resident on the GPU, step after
    step, with nothing queued before it to hide a copy still in flight (the 2048² layer's factors take about a
    millisecond to copy: a penalty that did not wait would read them half copied)."""
    kinds, taus = toy_factor_kinds()
    g = torch.Generator().manual_seed(5)
    gram = [x @ x.T / 2048 for x in torch.randn(2, 2048, 2048, generator=g)]
    kinds["large"] = KFAC({"large": LayerFactors(A=gram[0], B=gram[1], weight="large.weight", bias=None)},
                          {"kind": "kfac"})
    taus["large.weight"] = torch.randn(2048, 2048, generator=g)
    taus = {n: t.to(CUDA).requires_grad_() for n, t in taus.items()}
    for kind, factors in kinds.items():
        offloaded = CurvaturePenalty(factors, 3.0, offload=True, device=CUDA)
        assert all(t.device.type == "cpu" and t.is_pinned() for t in factor_tensors(offloaded.factors)), kind
        resident = CurvaturePenalty(factors, 3.0, device=CUDA)
        want = resident(taus)
        grads = torch.autograd.grad(want, list(taus.values()), allow_unused=True)
        for step in range(3):
            got = offloaded(taus, step)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=kind)
            for g, w in zip(torch.autograd.grad(got, list(taus.values()), allow_unused=True), grads):
                assert (g is None) == (w is None), kind
                if g is not None:
                    torch.testing.assert_close(g, w, rtol=1e-6, atol=0, msg=kind)


def test_offloaded_factors_and_factor_files_on_cuda(specs, registered, tmp_path, monkeypatch):
    """offload_factors keeps a CUDA run's factors on the CPU, from the moment each is fitted, between penalty steps,
    and trains the τ of a run that does not; a factor file (read on the CPU, cut to the trained layers, moved) trains
    the τ of the data."""
    base = config(specs["bert"], "tak", tmp_path / "plain", "cuda")
    plain = tak.train(base).task_vector.tensors
    offloaded = dataclasses.replace(base, out=str(tmp_path / "offloaded"), offload_factors=True)
    device = loop._device(offloaded)  # cuda:0, as the runs spell it: the backbone they loaded
    backbone = loop._backbone(offloaded, device)
    merged_on = []
    merge = training_factors.merge_kfac
    monkeypatch.setattr(training_factors, "merge_kfac", lambda parts, sizes: merged_on.extend(
        p[n].A.device.type for p in parts for n in p) or merge(parts, sizes))
    objective = loop.build_objective(offloaded, backbone, loop._task(offloaded.task, offloaded), device)
    factors = objective.penalty.factors
    assert merged_on and set(merged_on) == {"cpu"}  # each task's factors left the GPU as soon as fitted
    assert all(t.device.type == "cpu" and t.is_pinned()
               for name in factors for t in (factors[name].A, factors[name].B))
    path = fit(dataclasses.replace(base, task=TEXT_TASKS[1]), "kfac", tmp_path / "other.safetensors")
    for run in (offloaded, dataclasses.replace(base, out=str(tmp_path / "file"), tasks=[TEXT_TASKS[0]],
                                               factor_files=[str(path)])):
        tensors = tak.train(run).task_vector.tensors
        assert tensors.keys() == plain.keys() and all(rel_err(tensors[k], plain[k]) < 1e-5 for k in plain)


def test_evaluation_replays_the_frozen_layers_on_cuda(specs, registered):
    backbone = load_backbone(specs["bert"], device=CUDA)
    tasks = [tak.data.get_task(name) for name in TEXT_TASKS[:2]]
    g = torch.Generator().manual_seed(4)
    tv = TaskVector({n: 0.1 * torch.randn(p.shape, generator=g) for n, p in backbone.model.named_parameters()
                     if n.startswith("encoder.layer.1.")},
                    {**backbone.meta(), "regime": "nonlinear", "task": TEXT_TASKS[0], "method": "test"})
    alphas = [0.0, 0.5, 1.0]
    cache = {}
    replayed = Evaluator(backbone, tasks, "test", batch_size=8, cache=cache).sweep(tv, alphas)
    prefixes = [v for k, v in cache.items() if k[0] == "prefix"]  # one per task
    assert len(prefixes) == len(tasks) and all(p.paths and len(p.records) == 2 for p in prefixes)
    recorded = [t for p in prefixes for t in pytree.tree_leaves(p.records) if isinstance(t, torch.Tensor)]
    assert recorded and all(t.device.type == "cuda" for t in recorded)
    assert replayed == Evaluator(backbone, tasks, "test", batch_size=8, prefix_bytes=0).sweep(tv, alphas)
