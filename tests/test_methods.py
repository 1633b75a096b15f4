"""Each loss term of the methods equals its definition (float64 references on a toy model)."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import kfac_kernels as kk
import tak
from tak.backbones.base import Backbone, Head
from tak.data.task import Task
from tak.methods import (METHODS, CurvaturePenalty, Objective, TauJpPenalty, along_path_alpha, distillation_loss,
                         get_method, layer_weights, make_trainee, penalties)


class ToyBackbone(Backbone):
    """A 2-layer MLP on float vectors, features = its output; head from a fixed random matrix."""

    name = "toy"
    modalities = ("image",)

    def __init__(self, d_in=7, hidden=5, d_out=4, dtype=torch.float64):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)

    def inputs(self, examples):
        return torch.stack(examples)

    def features(self, model, batch):
        return model(batch)

    def _build_head(self, task):
        g = torch.Generator().manual_seed(len(task.classes))
        return Head(torch.randn(len(task.classes), 4, generator=g, dtype=torch.float64), normalize=False, scale=1.0)


def toy_task(name="toy", n=24, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 7, generator=g, dtype=dtype)
    ys = torch.randint(classes, (n,), generator=g)
    examples = [(x, int(y)) for x, y in zip(xs, ys)]
    return Task(name, [f"c{i}" for i in range(classes)], "image", ["{}"],
                {"train": lambda: examples, "val": lambda: examples[:6], "test": lambda: examples[6:12]})


def dense_quadratic(factors, taus, weights):
    """Σ_l w_l vec([W|b])ᵀ (B ⊗ A) vec([W|b]) with dense Kronecker products, float64."""
    total = torch.zeros((), dtype=torch.float64)
    for name, lf in factors.items():
        block = lf.block(taus, name)
        if block is None:
            continue
        K = torch.kron(lf.B.double(), lf.A.double())
        v = block.double().reshape(-1)
        total = total + weights.get(name, 1.0) * v @ K @ v
    return total


def test_kfac_penalty_equals_dense_quadratic_form_with_last_layer_weight():
    bb = ToyBackbone()
    batches = [torch.randn(5, 7, dtype=torch.float64) for _ in range(3)]
    factors = tak.fit_kfac(bb.model, batches, output_fn=bb.features, progress=False, dense=False)
    weights = layer_weights(factors, last_layer_weight=0.1)
    assert weights == {"0": 1.0, "2": 0.1}
    taus = {n: torch.randn_like(p) for n, p in bb.model.named_parameters()}
    penalty = CurvaturePenalty(factors, beta=3.5, weights=weights)
    got = penalty(taus, step=0)
    want = 3.5 * dense_quadratic(factors, taus, weights)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)


def test_penalty_every_n_steps_and_offloaded_factors_give_the_same_value():
    bb = ToyBackbone()
    factors = tak.fit_kfac(bb.model, [torch.randn(6, 7, dtype=torch.float64)], output_fn=bb.features,
                           progress=False, dense=False)
    taus = {n: torch.randn_like(p) for n, p in bb.model.named_parameters()}
    every = CurvaturePenalty(factors, 1.0, every=3, offload=True)
    plain = CurvaturePenalty(factors, 1.0)
    assert [every(taus, s) is None for s in range(4)] == [False, True, True, False]
    torch.testing.assert_close(every(taus, 3), plain(taus, 0))


def factor_tensors(factors) -> list[torch.Tensor]:
    """Every tensor that a factor container holds, gathered by the penalty's own map."""
    found = []
    penalties._map_tensors(factors, lambda t: found.append(t) or t)
    return found


def toy_factor_kinds():
    """A KFAC with dense and compressed (int8, low-rank, block-diagonal) factors, an EK-FAC, a GGN diagonal and
    per-task factors of the toy model, with τ for it."""
    bb = ToyBackbone(dtype=torch.float32)
    batches = [torch.randn(6, 7)]
    kfac = tak.fit_kfac(bb.model, batches, output_fn=bb.features, progress=False, dense=False)
    mixed = type(kfac)({"0": dataclasses.replace(kfac["0"], A=kk.Int8Factor.from_dense(kfac["0"].A),
                                                 B=kk.LowRankFactor.from_dense(kfac["0"].B, rank=2)),
                        "2": dataclasses.replace(kfac["2"], B=kk.BlockDiagonalFactor.from_dense(kfac["2"].B, k=2))},
                       kfac.meta)
    kinds = {"kfac": mixed, "ekfac": tak.fit_ekfac(bb.model, batches, output_fn=bb.features, progress=False),
             "diagonal": tak.fit_diagonal(bb.model, batches, output_fn=bb.features, progress=False),
             "per_task": tak.TaskFactors([kfac, mixed], [10, 30])}
    return kinds, {n: torch.randn_like(p) for n, p in bb.model.named_parameters()}


def test_factors_are_copied_tensor_by_tensor_whatever_their_kind():
    """The map the penalty moves and pins factors with rebuilds every kind of container, compressed factors
    included, with all its tensors: the copy gives the same penalty and shares no tensor with the original."""
    kinds, taus = toy_factor_kinds()
    for kind, factors in kinds.items():
        copied = penalties._map_tensors(factors, torch.clone)
        assert type(copied) is type(factors) and repr(copied) == repr(factors), kind
        originals, copies = factor_tensors(factors), factor_tensors(copied)
        assert len(copies) == len(originals) >= 2, kind
        assert all(type(c) is type(o) and torch.equal(c, o) and c.data_ptr() != o.data_ptr()
                   for c, o in zip(copies, originals)), kind
        assert torch.equal(copied.quadratic_form(taus), factors.quadratic_form(taus)), kind


def test_offloaded_factors_live_on_the_cpu_and_visit_the_device_at_penalty_steps():
    """With a device (here "meta", standing in for a GPU), resident factors move there once; offloaded ones stay on
    the CPU and each penalty step computes on a copy there; without a device the factors stay where they are."""
    kinds, taus = toy_factor_kinds()
    on_device = {n: t.to("meta") for n, t in taus.items()}
    for kind, factors in kinds.items():
        resident = CurvaturePenalty(factors, 1.0, device="meta")
        assert {t.device.type for t in factor_tensors(resident.factors)} == {"meta"}, kind
        offloaded = CurvaturePenalty(factors, 1.0, offload=True, device="meta")
        assert {t.device.type for t in factor_tensors(offloaded.factors)} == {"cpu"}, kind
        assert offloaded(on_device, step=0).device.type == "meta" and offloaded._visits.copy is None, kind
        assert CurvaturePenalty(factors, 1.0, offload=True).factors is factors, kind  # no device: stays


@pytest.mark.parametrize("teacher_beta", [2.0, 0.0])
def test_delta_s_two_penalties_share_one_device_copy_of_offloaded_factors(teacher_beta, monkeypatch):
    kinds, taus = toy_factor_kinds()
    on_device = {n: t.to("meta") for n, t in taus.items()}
    copies = []
    visit = penalties._Visits._visit
    monkeypatch.setattr(penalties._Visits, "_visit", lambda self, device: copies.append(visit(self, device))
                        or copies[-1])
    student = CurvaturePenalty(kinds["ekfac"], 1.0, offload=True, device="meta", every=2)
    teacher = student.with_beta(teacher_beta)
    for step in range(4):
        del copies[:]
        drifts = [student(on_device, step), teacher(on_device, step)]
        if step % 2:
            assert drifts == [None, None] and copies == []
        else:
            assert drifts[0].device.type == "meta" and (drifts[1] is None) == (teacher_beta == 0)
            assert len(copies) == 1 and student._visits.copy is None  # one copy, not kept after


def test_layer_weights_patterns_must_match():
    bb = ToyBackbone()
    factors = tak.fit_kfac(bb.model, [torch.randn(4, 7, dtype=torch.float64)], output_fn=bb.features,
                           progress=False, dense=False)
    assert layer_weights(factors, patterns={"0": 2.0}) == {"0": 2.0, "2": 1.0}
    with pytest.raises(ValueError, match="matches no factored layer"):
        layer_weights(factors, patterns={"nope*": 2.0})


def test_later_layer_weight_patterns_win():
    """patterns apply in order, a later glob overriding an earlier one on the layers both match."""
    bb = ToyBackbone()
    factors = tak.fit_kfac(bb.model, [torch.randn(4, 7, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64)], output_fn=bb.features, progress=False, dense=False)
    assert layer_weights(factors, patterns={"*": 2.0, "2": 5.0}) == {"0": 2.0, "2": 5.0}
    assert layer_weights(factors, patterns={"2": 5.0, "*": 2.0}) == {"0": 2.0, "2": 2.0}


def test_along_path_alpha_is_uniform_on_half_to_one_and_a_function_of_seed_and_step():
    """DELTA's α ~ U(0.5, 1): 2000 draws lie in [0.5, 1] and fill it; (seed, step) alone fixes each."""
    alphas = [along_path_alpha(3, step) for step in range(2000)]
    assert all(0.5 <= a <= 1.0 for a in alphas)
    assert min(alphas) < 0.55 and max(alphas) > 0.95
    assert [along_path_alpha(3, step) for step in (0, 17, 1999)] == [alphas[0], alphas[17], alphas[1999]]
    assert along_path_alpha(4, 17) != alphas[17]


def test_tau_jp_equals_explicit_jacobian_norm():
    bb = ToyBackbone()
    trainee = make_trainee(get_method("linear"), bb.model, None)
    with torch.no_grad():
        for t in trainee.taus().values():
            t.copy_(torch.randn_like(t))
    x = torch.randn(4, 7, dtype=torch.float64)
    penalty = TauJpPenalty([x], beta=2.0, features=bb.features)
    got = penalty(trainee, step=0)
    params = dict(bb.model.named_parameters())
    taus = trainee.task_vector()
    want = 0.0
    for n in range(len(x)):
        J = jacrev(lambda p: functional_call(bb.model, p, (x[n:n + 1],)))(params)
        jt = sum(J[k].reshape(4, -1) @ taus[k].reshape(-1) for k in params)
        want += jt.pow(2).sum() / len(x)
    torch.testing.assert_close(got, 2.0 * want)


@pytest.mark.filterwarnings("ignore:tak.linearize. generic torch.func.jvp path")
def test_tau_jp_in_train_mode_is_zero_at_theta0_and_takes_its_batch_by_step():
    """With dropout on, f_lin and f(x; θ0) share one forward's masks, so the penalty is 0 at τ = 0; the
    k-th application (k = step // every) uses batch k mod len(batches)."""
    bb = ToyBackbone()
    bb.model = nn.Sequential(nn.Linear(7, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 4)).double()
    trainee = make_trainee(get_method("linear"), bb.model, None).train()
    batches = [torch.randn(6, 7, dtype=torch.float64) for _ in range(3)]
    seen = []
    penalty = TauJpPenalty(batches, beta=1.0, features=lambda m, b: seen.append(b) or bb.features(m, b), every=2)
    assert penalty(trainee, step=0) == 0
    with torch.no_grad():
        for t in trainee.taus().values():
            t.copy_(torch.randn_like(t))
    seen.clear()
    values = [penalty(trainee, step) for step in range(8)]
    assert [v is None for v in values] == [False, True] * 4 and all(v > 0 for v in values[::2])
    assert [next(i for i, b in enumerate(batches) if b is x) for x in seen[::2]] == [0, 1, 2, 0]


def test_along_path_distillation_matches_its_formula_at_fixed_alpha():
    """L_KD = 1/B Σ ‖f(x; θ0 + α τ_S) − (f0 + α J τ_T)‖² with the objective's own α(seed, step)."""
    bb = ToyBackbone()
    task = toy_task()
    method = get_method("delta_no_ekfac")
    obj = Objective(method, bb, bb.head(task), {**method.defaults, "gamma": 0.7}, seed=5)
    with torch.no_grad():
        for p in list(obj.student.parameters()) + list(obj.teacher.parameters()):
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.stack([e[0] for e in task.split("train")[:5]])
    y = torch.tensor([e[1] for e in task.split("train")[:5]])
    _, terms = obj(x, y, step=11)
    alpha = along_path_alpha(5, 11)
    assert 0.5 <= alpha <= 1.0
    theta0 = dict(bb.model.named_parameters())
    tau_s, tau_t = obj.student.task_vector(), obj.teacher.task_vector()
    student = functional_call(bb.model, {k: theta0[k] + alpha * tau_s[k] for k in theta0}, (x,))
    _, jvp_t = torch.func.jvp(lambda p: functional_call(bb.model, p, (x,)), (dict(theta0),), (tau_t,))
    teacher = bb.model(x) + alpha * jvp_t
    want = 0.7 * (student - teacher).pow(2).sum(-1).mean()
    torch.testing.assert_close(terms["distill"].double(), want.detach())
    assert distillation_loss(student, teacher).item() == pytest.approx(want.item() / 0.7)


def test_distillation_gradient_reaches_the_student_only():
    bb = ToyBackbone()
    task = toy_task()
    method = get_method("delta_no_ekfac")
    obj = Objective(method, bb, bb.head(task), {**method.defaults, "gamma": 1.0}, seed=0)
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.stack([e[0] for e in task.split("train")[:5]])
    student_alpha = bb.features(obj.student.at(0.75), x)
    teacher = bb.features(obj.teacher.at(0.75), x)
    distillation_loss(student_alpha, teacher).backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.student.parameters())


def test_delta_penalizes_the_teachers_tau_with_the_teacher_penalty_and_the_students_with_its_own():
    """DELTA's terms: drift = penalty(τ_S), teacher_drift = teacher_penalty(τ_T), each on its own trainee's τ."""
    bb = ToyBackbone()
    task = toy_task()
    method = get_method("delta")

    def squares(weight):
        return lambda taus, step: weight * sum(t.double().pow(2).sum() for t in taus.values())

    obj = Objective(method, bb, bb.head(task), {**method.defaults, "gamma": 0.5}, penalty=squares(3.0),
                    teacher_penalty=squares(7.0), seed=1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for scale, trainee in ((0.1, obj.student), (0.9, obj.teacher)):
            for p in trainee.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.stack([e[0] for e in task.split("train")[:5]])
    y = torch.tensor([e[1] for e in task.split("train")[:5]])
    _, terms = obj(x, y, step=2)
    student = sum(t.double().pow(2).sum() for t in obj.student.task_vector().values())
    teacher = sum(t.double().pow(2).sum() for t in obj.teacher.task_vector().values())
    assert abs(student - teacher) > 0.1 * teacher
    torch.testing.assert_close(terms["drift"].double(), 3.0 * student, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["teacher_drift"].double(), 7.0 * teacher, rtol=1e-6, atol=0)


def test_lora_student_takes_the_runs_rank_and_the_teacher_the_runs_trainable_selection():
    """delta_lora's student has LoRA factors of hp["lora_rank"]; teacher and student train what ``trainable`` selects."""
    bb = ToyBackbone()
    task = toy_task()
    method = get_method("delta_lora")
    obj = Objective(method, bb, bb.head(task), {**method.defaults, "lora_rank": 3}, trainable=["2.*"])
    assert [tuple(a.shape) for a in obj.student.A] == [(3, 5)] and [tuple(b.shape) for b in obj.student.B] == [(4, 3)]
    assert set(obj.student.taus()) == {"2.weight"} and set(obj.teacher.taus()) == {"2.weight", "2.bias"}
    assert tuple(make_trainee(method, bb.model, "all", lora_rank=2).A[0].shape) == (2, 7)


@pytest.mark.parametrize("name", ["nonlinear", "linear", "attn_only", "delta_lora"])
def test_trainee_task_vector_is_theta_minus_theta0(name):
    bb = ToyBackbone()
    method = get_method(name)
    trainable = "0.*" if name == "attn_only" else None  # the toy MLP has no attention
    trainee = make_trainee(method, bb.model, trainable, lora_rank=2)
    with torch.no_grad():
        for p in trainee.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    taus = trainee.task_vector()
    x = torch.randn(3, 7, dtype=torch.float64)
    theta0 = dict(bb.model.named_parameters())
    for alpha in (1.0, 0.6):
        params = {k: theta0[k] + alpha * taus.get(k, torch.zeros_like(theta0[k])) for k in theta0}
        if trainee.regime == "linear":
            _, dot = torch.func.jvp(lambda p: functional_call(bb.model, p, (x,)), (dict(theta0),),
                                    ({k: alpha * taus.get(k, torch.zeros_like(v)) for k, v in theta0.items()},))
            want = bb.model(x) + dot
        else:
            want = functional_call(bb.model, params, (x,))
        torch.testing.assert_close(bb.features(trainee.at(alpha), x), want)


@pytest.mark.parametrize("architecture", ["open_clip_vit", "bert", "t5_tied_embedding"])
def test_decay_anchors_pair_each_trained_tensor_with_the_theta0_of_its_name(architecture):
    """decay_to="zero" pulls each τ of a linearized model (here the fused fast path) to −θ0 of its own parameter and
    "pretrained" pulls none; a non-linear trainee's θ is pulled to +θ0 for "pretrained" only; LoRA factors never."""
    from tak.methods.trainees import LinearTrainee, LoRATrainee, NonlinearTrainee
    from tests.test_tak_models import tiny_bert, tiny_t5_config, vit
    import transformers
    model = {"open_clip_vit": vit, "bert": tiny_bert,
             "t5_tied_embedding": lambda: transformers.T5EncoderModel(tiny_t5_config("relu")).double()}[architecture]()
    theta0 = dict(model.named_parameters())
    linear = LinearTrainee(model)
    assert type(linear.lin).__name__ == "DualLinearizedModel"
    nonlinear = NonlinearTrainee(model)
    for trainee, decay_to, sign, trained in (
            (linear, "zero", -1.0, dict(linear.lin._taus())),
            (nonlinear, "pretrained", 1.0, {n: nonlinear.model.get_parameter(n) for n in nonlinear.names})):
        name_of = {id(p): n for n, p in trained.items()}
        anchors = trainee.decay_anchors(decay_to)
        assert sorted(name_of[id(p)] for p, _, _ in anchors) == sorted(theta0)  # every trained tensor, once
        for p, anchor, s in anchors:
            assert s == sign and torch.equal(anchor, theta0[name_of[id(p)]])
    assert linear.decay_anchors("pretrained") == [] and nonlinear.decay_anchors("zero") == []
    assert LoRATrainee(model, "attention", rank=2).decay_anchors("zero") == []


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_lora_adapts_the_fused_qkv_projection_of_multihead_attention():
    """open_clip keeps q/k/v in nn.MultiheadAttention.in_proj_weight: the LoRA student adapts it as the
    weight matrix (3d, d) it is, so it evaluates θ0 + α τ with τ = (scale/r) B A."""
    from tak.methods.trainees import LoRATrainee
    torch.manual_seed(0)
    model = SelfAttention().double()
    trainee = LoRATrainee(model, "attention", rank=3)
    assert trainee.names == ["attn.in_proj_weight", "attn.out_proj.weight"]
    with torch.no_grad():
        for B in trainee.B:
            B.normal_()
    taus = trainee.task_vector()
    assert taus["attn.in_proj_weight"].shape == (24, 8) and torch.linalg.matrix_rank(taus["attn.in_proj_weight"]) == 3
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    theta0 = dict(model.named_parameters())
    want = functional_call(model, {k: v + 0.7 * taus.get(k, torch.zeros_like(v)) for k, v in theta0.items()}, (x,))
    torch.testing.assert_close(trainee.at(0.7)(x), want)


def test_trainable_names_select_as_linearize_does():
    """Patterns match tied aliases and must each match; "attention" is the q/k/v/o projections, not T5's
    relative position bias."""
    from tak.methods.trainees import trainable_names
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    assert trainable_names(model, ["lm_head.weight"]) == ["shared.weight"]  # tied to the shared embedding
    with pytest.raises(ValueError, match=r"\['encoder.blok.\*'\] match no parameter of the model"):
        trainable_names(model, ["decoder.*", "encoder.blok.*"])
    attention = trainable_names(model, "attention")
    assert attention and all(n.split(".")[-2] in "qkvo" for n in attention), attention
    from tak.methods.trainees import attention_only
    open_clip_names = ["transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.bias",
                       "transformer.resblocks.0.ln_attn.weight", "transformer.resblocks.0.attn.ln_inner.bias",
                       "transformer.resblocks.0.ln_1.weight", "encoder.layer.0.attention.output.LayerNorm.weight"]
    assert [attention_only(n) for n in open_clip_names] == [True, True, False, False, False, False]


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid methods: nonlinear, linear"):
        get_method("takk")
    assert {"nonlinear", "linear", "attn_only", "tak", "attn_only_tak", "diag_ggn", "tau_jp", "delta"} <= set(METHODS)


def test_last_layer_weight_skips_the_exact_dense_blocks():
    """With dense=True the LayerNorm blocks come after the linear layers; the 0.1 goes to the last linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.LayerNorm(3)).double()
    factors = tak.fit_kfac(model, [torch.randn(6, 5, dtype=torch.float64)], progress=False)
    weights = layer_weights(factors, last_layer_weight=0.1)
    assert list(factors)[-1] != "2" and weights["2"] == 0.1
    assert all(w == 1.0 for n, w in weights.items() if n != "2")


def test_last_layer_weight_goes_to_the_backbones_last_layer_or_to_none():
    """The layer a backbone names (CLIP's proj) gets the weight; where it is not factored (attn_only_tak trains no
    proj), no layer does: the last trained attention layer is not the model's last layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    factors = tak.fit_kfac(model, [torch.randn(6, 5, dtype=torch.float64)], progress=False)
    assert layer_weights(factors, last_layer_weight=0.1, last_layer="0") == {"0": 0.1, "2": 1.0}
    assert layer_weights(factors, last_layer_weight=0.1, last_layer="proj") == {"0": 1.0, "2": 1.0}


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "diagonal"])
def test_last_layer_weight_skips_layers_the_features_do_not_reach(kind):
    """A linear layer after the features (BERT's pooler under mean pooling) gets no factors, or, in a file of
    an earlier version, zero curvature: the 0.1 goes to the last layer the features depend on."""
    import dataclasses

    from tak.curvature.diagonal import fit_diagonal
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 2)).double()
    fit = {"kfac": tak.fit_kfac, "ekfac": tak.fit_ekfac, "diagonal": fit_diagonal}[kind]
    factors = fit(model, [torch.randn(6, 5, dtype=torch.float64)], output_fn=lambda m, x: m[:3](x), progress=False)
    assert layer_weights(factors, last_layer_weight=0.1) == {"0": 1.0, "2": 0.1}
    zero = dataclasses.replace(factors["2"], **{f.name: torch.zeros_like(getattr(factors["2"], f.name))
                                                for f in dataclasses.fields(factors["2"]) if f.name in "BSD"})
    older = type(factors)({**factors.factors, "3": zero}, factors.meta)  # as an earlier fit stored layer 3
    assert layer_weights(older, last_layer_weight=0.1) == {"0": 1.0, "2": 0.1, "3": 1.0}
