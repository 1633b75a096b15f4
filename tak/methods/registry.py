"""The training methods, by the names the CLI spells, with the defaults the papers use.

Sources of the defaults (stated per method in ``Method.source``):
- TAK (Porrello et al.), Sec. E: AdamW, lr 3e-4, weight decay 0.1 (vision) / 0.01 (text), cosine
  schedule, batch 128, no gradient clipping; β = 100 (ViT-B/32), 500 (ViT-B/16), 2000 (ViT-L/14),
  20 (T5, KFAC), 0.1 (T5, diagonal GGN); last layer's penalty × 0.1.
- Baselines (non-linear / linear fine-tuning, Ilharco et al. 2022; Ortiz-Jiménez et al. 2023):
  AdamW, lr 1e-5, weight decay 0.1, cosine, batch 128.
- DELTA (Sommariva et al.), App. B: vision lr 1e-5, wd 0.1, β^T = β^S = 500, γ = 1;
  text lr 3e-4, wd 0.01, β = 20, γ = 0.01; α ~ U(0.5, 1) per step; EK-FAC on a reference set.

``Method.defaults`` are the vision settings; ``Method.text_defaults`` override them for text backbones
(TAK App. E and DELTA App. B, language task vectors: every method at lr 3e-4 and weight decay 0.01; KFAC β = 20,
diagonal β = 0.1, DELTA β^T = β^S = 20 and γ = 0.01; the last layer's 0.1 is for the CLIP visual encoder only).
``hyperparameter_defaults(method, modalities, backbone)`` picks them by the trained task's modality and, for
the KFAC methods on CLIP, by the vision transformer (β = 500 for ViT-B/16 and 2000 for ViT-L/14 architectures;
``clip_architecture`` reads it from the backbone spec).
Weight decay acts on θ = θ0 + τ in both regimes, as in the papers' code, whose linearized model trains θ from θ0
(``TrainConfig.decay_to``; "pretrained" decays τ instead).
"""
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    """name; regime "linear" (τ of the linearized model) or "nonlinear"; trainable: "all" or
    "attention" (attention projections only, Jin et al. 2025); penalty: None, "kfac" (merged factors of
    the other tasks, TAK Eq. 8, or per task, Eq. 7), "diagonal" (diagonal GGN), "ekfac" (reference
    set, DELTA Eq. 6), "tau_jp" (‖J τ‖² on the other tasks' inputs); teacher: DELTA's linearized
    teacher with along-path distillation; student: "full" or "lora"; defaults: hyperparameters (vision),
    text_defaults: what differs for text backbones."""

    name: str
    description: str
    regime: str
    trainable: str = "all"
    penalty: str | None = None
    teacher: bool = False
    student: str = "full"
    defaults: dict = field(default_factory=dict)
    source: str = ""
    text_defaults: dict = field(default_factory=dict)


_BASELINE = {"lr": 1e-5, "weight_decay": 0.1}
_TAK = {"lr": 3e-4, "weight_decay": 0.1, "beta": 100.0, "last_layer_weight": 0.1}
_TAK_VIT_BETA = {**dict.fromkeys(["ViT-B-16", "ViT-B-16-quickgelu"], 500.0),  # TAK Sec. E.1; others (B/32): 100
                 **dict.fromkeys(["ViT-L-14", "ViT-L-14-quickgelu", "ViT-L-14-336", "ViT-L-14-336-quickgelu"], 2000.0)}
_DELTA = {"lr": 1e-5, "weight_decay": 0.1, "beta": 500.0, "beta_teacher": 500.0, "gamma": 1.0, "last_layer_weight": 1.0}
_TEXT = {"lr": 3e-4, "weight_decay": 0.01}
_TAK_TEXT = {**_TEXT, "beta": 20.0, "last_layer_weight": 1.0}
_DELTA_TEXT = {**_TEXT, "beta": 20.0, "beta_teacher": 20.0, "gamma": 0.01}


def _without(defaults: dict, *keys: str) -> dict:
    """``defaults`` less the hyperparameters an ablation does not have (so a value set for one is refused)."""
    return {k: v for k, v in defaults.items() if k not in keys}

METHODS = {m.name: m for m in [
    Method("nonlinear", "standard fine-tuning of all parameters", "nonlinear", defaults=_BASELINE,
           source="Ilharco et al. 2022", text_defaults=_TEXT),
    Method("linear", "fine-tuning in the tangent space (linearized model)", "linear", defaults=_BASELINE,
           source="Ortiz-Jiménez et al. 2023", text_defaults=_TEXT),
    Method("attn_only", "fine-tuning of the attention projections only", "nonlinear", trainable="attention",
           defaults=_BASELINE, source="Jin et al. 2025", text_defaults=_TEXT),
    Method("tak", "linearized + KFAC drift penalty from the other tasks' factors", "linear", penalty="kfac",
           defaults=_TAK, source="TAK Eq. 7/8, Sec. E", text_defaults=_TAK_TEXT),
    Method("attn_only_tak", "attention-only + KFAC drift penalty", "nonlinear", trainable="attention",
           penalty="kfac", defaults=_TAK, source="TAK Sec. 5 (non-linear regime)", text_defaults=_TAK_TEXT),
    Method("diag_ggn", "linearized + diagonal GGN drift penalty", "linear", penalty="diagonal",
           defaults={**_TAK, "beta": 0.1}, source="TAK Sec. E (T5: λ = 0.1)", text_defaults={**_TAK_TEXT, "beta": 0.1}),
    Method("tau_jp", "linearized + ‖J τ x‖² on the other tasks' data", "linear", penalty="tau_jp",
           defaults={"lr": 3e-4, "weight_decay": 0.1, "beta": 1.0}, source="Yoshida et al. 2025 (τJp)",
           text_defaults={**_TEXT, "beta": 1.0}),  # no curvature: no last-layer weight
    Method("delta", "non-linear student distilled along the path from a linearized EK-FAC teacher", "nonlinear",
           penalty="ekfac", teacher=True, defaults=_DELTA, source="DELTA Alg. 1, App. B", text_defaults=_DELTA_TEXT),
    Method("delta_no_teacher", "DELTA ablation: student with EK-FAC penalty, no teacher", "nonlinear",
           penalty="ekfac", defaults=_without(_DELTA, "beta_teacher", "gamma"), source="DELTA Sec. 5 ablations",
           text_defaults=_without(_DELTA_TEXT, "beta_teacher", "gamma")),
    Method("delta_no_ekfac", "DELTA ablation: along-path distillation without curvature penalties", "nonlinear",
           teacher=True, defaults=_without(_DELTA, "beta", "beta_teacher", "last_layer_weight"),
           source="DELTA Sec. 5 ablations", text_defaults=_without(_DELTA_TEXT, "beta", "beta_teacher")),
    Method("delta_lora", "DELTA with a LoRA student", "nonlinear", penalty="ekfac", teacher=True, student="lora",
           defaults={**_DELTA, "lora_lr": 3e-4, "lora_rank": 16}, text_defaults=_DELTA_TEXT,
           source="DELTA App. A names PEFT (LoRA) without settings: the fully fine-tuned teacher keeps DELTA's lr "
                  "(App. B); the LoRA student's lr 3e-4 (lora_lr) and rank 16 are ours, LoRA's usual ones"),
]}


def clip_architecture(backbone: str) -> str | None:
    """The CLIP architecture a backbone spec names, as open_clip spells it: ``clip:<arch>``'s; for ``hf-clip:`` and
    ``clip:hf-hub:`` models, the ViT size and patch in their names (``openai/clip-vit-base-patch16`` -> ViT-B-16,
    ``laion/CLIP-ViT-L-14-laion2B-s32B-b82K`` -> ViT-L-14); None where the spec names none."""
    prefix, _, rest = backbone.partition(":")
    if prefix == "clip" and not rest.startswith(("local-dir:", "hf-hub:")):
        return rest
    match = re.search(r"vit-([bl])(?:ase|arge)?-(?:patch)?(\d+)", rest, re.IGNORECASE) if prefix in (
        "clip", "hf-clip") else None
    return None if match is None else f"ViT-{match[1].upper()}-{match[2]}"


def hyperparameter_defaults(method: Method, modalities, backbone: str = "") -> dict:
    """The paper defaults of ``method`` for tasks of these input modalities (the trained task's): ``text_defaults``
    over ``defaults`` when any is text ("text", "text-pair"), else ``defaults``, with the KFAC penalty's β of
    the CLIP architecture in ``backbone`` (a backbone spec, e.g. "clip:ViT-B-16": ``clip_architecture``)."""
    if any(m.startswith("text") for m in modalities):
        return {**method.defaults, **method.text_defaults}
    defaults = dict(method.defaults)
    if method.penalty == "kfac":
        defaults["beta"] = _TAK_VIT_BETA.get(clip_architecture(backbone), defaults["beta"])
    return defaults


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
