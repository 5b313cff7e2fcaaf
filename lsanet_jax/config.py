"""Run settings of ``lsanet-train``: one dataclass whose fields declare the CLI, and the ablation ladder.

Each field is declared once (``runkit.config.option``): its help, flag, ``--help`` group (data, model,
training, run) and whether a resumed run must share it. Only settings that leave the computed result
unchanged are declared ``resume=False``: where the data files lie, the device layout, how many
checkpoints are kept.
"""
from __future__ import annotations

import dataclasses

from runkit.config import check_ranges, option

from lsanet_jax.backbones import ATTENTION_KINDS, BACKBONES, backbone_spec
from lsanet_jax.data.medmnist import DEFAULT_ROOT, INFO, SIZES, check_flag
from lsanet_jax.models import AUX_KINDS, resolve_aux_stages

__all__ = ["ABLATION_SWITCHES", "EPOCH_LOOPS", "VARIANTS", "TrainConfig"]

# The ablation ladder: plain backbone -> + deep supervision -> + LSA (with dynamic aux weights)
# -> + knowledge synergy (= LSANet).
VARIANTS = {
    "plain": dict(aux="none", lsa=False, dynamic_aux_weights=False, synergy=False),
    "ds": dict(aux="dks", lsa=False, dynamic_aux_weights=False, synergy=False),
    "ds_lsa": dict(aux="dks", lsa=True, dynamic_aux_weights=True, synergy=False),
    "lsanet": dict(aux="dks", lsa=True, dynamic_aux_weights=True, synergy=True),
}
ABLATION_SWITCHES = tuple(VARIANTS["lsanet"])
EPOCH_LOOPS = ("auto", "scan", "host")  # see lsanet_jax.steps.resolve_epoch_loop

_BY_VARIANT = "set by --variant"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # The field order is the order of summary.json's "config".
  flag: str = option("pathmnist", f"dataset: {', '.join(INFO)} ('digits' = scikit-learn's digits in MedMNIST "
                     "format, not medical)", group="data")
  root: str = option(DEFAULT_ROOT, "folder holding {flag}.npz / {flag}_{size}.npz", group="data", resume=False)
  size: int = option(28, "image size in pixels", group="data", choices=SIZES)
  backbone: str = option("resnet18", "the CNN the branches are built from", group="model", choices=BACKBONES)
  attention: str = option("none", "attention module in every block", group="model", choices=ATTENTION_KINDS)
  width: float = option(1.0, "channel width multiplier", group="model", above=0)
  stem: str = option("", "'28': 3x3/1 stem; '224': torchvision 7x7/2 + max-pool", group="model",
                     choices=("", "28", "224"), default_help="by --size")
  aux: str = option("dks", "auxiliary branches: DKS copies of the later stages, or light 1x1 conv heads",
                    group="model", choices=AUX_KINDS, default_help=_BY_VARIANT)
  aux_stages: tuple[int, ...] = option((), "1-based stages to branch after, e.g. 2,3", group="model",
                                       default_help="the two stages before the last")
  lsa: bool = option(True, "layer selective attention fusing all branches into the fused head", group="model",
                     default_help=_BY_VARIANT)
  dynamic_aux_weights: bool = option(True, "weight auxiliary losses by the LSA layer weights", group="model",
                                     default_help=_BY_VARIANT)
  synergy: bool = option(True, "DKS knowledge synergy between all heads", group="model", default_help=_BY_VARIANT)
  lsa_dim: int = option(128, "width of the LSA projections", group="model", minimum=1)
  label_fraction: float = option(1.0, "stratified fraction of training labels to use, e.g. 0.01 0.05 0.1 0.25 1",
                                 group="data", above=0, maximum=1)
  epochs: int = option(100, "passes over the training set", group="training", minimum=1)
  batch_size: int = option(128, "training batch size", group="training", minimum=1)
  learning_rate: float = option(1e-3, "Adam step size, x0.1 after half and after three quarters of the epochs",
                                flag="--lr", group="training", above=0)
  # The bounds of numpy's and scikit-learn's seeds (the label subset, the digits split).
  seed: int = option(0, "seed of the label subset, the digits split, initialisation and batches", group="training",
                     minimum=0, maximum=2**32 - 1)
  augment: bool = option(False, "random flips and padded crops", group="training", const=True)
  bf16: bool = option(False, "bfloat16 compute (parameters stay float32)", group="training", const=True)
  as_rgb: bool = option(False, "repeat grey images to 3 channels", group="data", const=True)
  # Part of the resume check: another evaluation batch shape may round the scores differently.
  eval_batch_size: int = option(512, "images per evaluation batch", group="training", minimum=1, cli=False)
  epoch_loop: str = option("auto", "one lax.scan-compiled function per epoch (scan), or a jit-compiled step "
                           "driven from Python (host); auto: scan except on CPU", group="training",
                           choices=EPOCH_LOOPS)
  # Data parallelism trains what one device trains (up to summation order), so a run may resume
  # on another device count.
  data_parallel: bool = option(False, "split every batch over all local devices (batch size divisible by their "
                               "number); the same training as on one device, BatchNorm over the whole batch",
                               group="training", const=True, resume=False)
  keep_checkpoints: int = option(2, "number of newest checkpoints kept", group="run", minimum=1, resume=False)

  @classmethod
  def for_variant(cls, variant: str = "lsanet", **settings) -> TrainConfig:
    """The rung ``variant`` of the ablation ladder, with ``settings`` (e.g. those set on the command
    line) taking precedence over its switches.

    Switching LSA off by hand also switches off the dynamic auxiliary weights that come from it, and
    switching the auxiliary branches off also switches off knowledge synergy, unless those are set too.
    """
    if variant not in VARIANTS:
      raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    switches = {**VARIANTS[variant], **{k: v for k, v in settings.items() if k in ABLATION_SWITCHES}}
    if not switches["lsa"] and "dynamic_aux_weights" not in settings:
      switches["dynamic_aux_weights"] = False
    if switches["aux"] == "none" and "synergy" not in settings:
      switches["synergy"] = False
    return cls(**{**settings, **switches})

  @property
  def resolved_stem(self) -> str:
    return self.stem or ("28" if self.size == 28 else "224")

  @property
  def selection_head(self) -> str:
    """The head whose validation AUC picks the best epoch."""
    return "fused" if self.lsa else "main"

  def validate(self) -> None:
    """Raises ValueError naming the bad setting and the fix."""
    check_ranges(self)
    for field in dataclasses.fields(self):
      allowed, value = field.metadata["choices"], getattr(self, field.name)
      if allowed is not None and value not in allowed:
        raise ValueError(f"unknown {field.name.replace('_', ' ')} {value!r}; choose one of "
                         f"{', '.join(map(repr, allowed))}")
    check_flag(self.flag)
    if self.lsa and self.aux == "none":
      raise ValueError("LSA fuses the auxiliary branches with the main one: use --aux dks (or light) "
                       "with --lsa, or pass --no-lsa")
    if self.dynamic_aux_weights and not self.lsa:
      raise ValueError("dynamic auxiliary weights come from the LSA layer weights: pass --lsa or "
                       "--no-dynamic-aux-weights")
    if self.synergy and self.aux == "none":
      raise ValueError("knowledge synergy matches the predictions of several heads: enable --aux "
                       "or pass --no-synergy")
    spec = backbone_spec(self.backbone, stem=self.resolved_stem, width=self.width, attention=self.attention)
    try:
      resolve_aux_stages(self.aux, self.aux_stages, spec.num_stages)
    except ValueError as e:
      raise ValueError(f"--aux-stages: {e}") from None
