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
from lsanet_jax.data.own_data import TASKS as OWN_TASKS
from lsanet_jax.data.tfds_builder import DEFAULT_DATA_DIR as DEFAULT_TFDS_DATA_DIR
from lsanet_jax.models import AUX_KINDS, resolve_aux_stages

__all__ = ["ABLATION_SWITCHES", "EPOCH_LOOPS", "EVAL_IMAGES_PER_TRAIN_IMAGE", "SOURCES", "VARIANTS", "TrainConfig"]

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
SOURCES = ("npz", "tfds")
# eval_every=0 (auto) validates every N epochs, the smallest N for which the run's evaluation images (each
# validation pass, one test pass) number at most this many times its training images (epochs x labelled
# images). A training image costs a forward and a backward pass of every branch, an evaluation image a
# forward pass: 2.8x (width 1) to 7x (width 1/4) apart on CPU (docs/lsanet.md, "Evaluation cadence"), so
# evaluation then takes at most about 0.5 / (2.8 + 0.5) = 15% of the run.
EVAL_IMAGES_PER_TRAIN_IMAGE = 0.5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # The field order is the order of summary.json's "config".
  flag: str = option("pathmnist", f"dataset: {', '.join(INFO)} ('digits' = scikit-learn's digits in MedMNIST "
                     "format, not medical)", group="data", default_help="pathmnist; none with --data")
  root: str = option(DEFAULT_ROOT, "folder holding {flag}.npz / {flag}_{size}.npz", group="data", resume=False)
  # Own data is named by its path (there is no flag to name it), so the path is part of the resume check.
  data: str = option("", "your own data instead of --flag: an npz in MedMNIST's layout (train_/val_/test_images "
                     "and _labels) or a folder of PNG/JPEG images in class subfolders (DIR/<class>/ or "
                     "DIR/train|val|test/<class>/; a split without its folder is drawn from the training "
                     "images: 10%% val, 20%% test per class); images resized to --size", group="data",
                     default_help="none")
  task: str = option("", "task of --data", group="data", choices=("", *OWN_TASKS),
                     default_help="inferred: multi-label for (N, K>1) 0/1 labels, binary-class for 2 classes, "
                     "else multi-class")
  num_classes: int = option(0, "class count of --data (labels 0..C-1)", group="data", minimum=0,
                            default_help="inferred: 1 + the largest label, or the number of class folders")
  # How the same MedMNIST data reach the run does not change what it trains on (the TFDS reader keeps
  # the npz's row order), so a run may resume from the other source.
  source: str = option("npz", "where --flag is read: the npz in --root, or the TFDS dataset in --tfds-data-dir "
                       "(built there from --root's npz if missing; tensorflow-datasets, no TensorFlow)",
                       group="data", choices=SOURCES, resume=False)
  tfds_data_dir: str = option(DEFAULT_TFDS_DATA_DIR, "TFDS data folder for --source tfds", group="data",
                              resume=False)
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
  seed: int = option(0, "seed of initialisation and batches, and of the data draws unless --label-seed is given",
                     group="training", minimum=0, maximum=2**32 - 1)
  label_seed: int | None = option(None, "seed of the data draws: the labelled subset (--label-fraction), the "
                                  "digits split and the splits drawn for a --data folder; fix it to vary only "
                                  "initialisation and batches with --seed", group="training", minimum=0,
                                  maximum=2**32 - 1, default_help="--seed")
  augment: bool = option(False, "random flips and padded crops", group="training", const=True)
  bf16: bool = option(False, "bfloat16 compute (parameters stay float32)", group="training", const=True)
  as_rgb: bool = option(False, "repeat grey images to 3 channels", group="data", const=True)
  eval_every: int = option(0, "validate every N epochs and at the last epoch (the best validation epoch is "
                           "kept; test is scored once, with its weights); 0 = auto: the smallest N for which the run's "
                           f"validation and test images number at most {EVAL_IMAGES_PER_TRAIN_IMAGE:g} x its training "
                           "images (epochs x labelled images), so that evaluation stays a small part of "
                           "low-label runs", group="training", minimum=0,
                           default_help="0 = auto")
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
  # Saving the whole state takes seconds on a busy CPU, longer than an epoch of a small labelled subset.
  checkpoint_every: int = option(1, "epochs between checkpoints; the last epoch (and the one --stop-after-epochs "
                                 "stops at) is always saved, and a run stopped in between resumes from the last "
                                 "saved epoch", group="run", minimum=1, resume=False)

  @classmethod
  def for_variant(cls, variant: str = "lsanet", **settings) -> TrainConfig:
    """The rung ``variant`` of the ablation ladder, with ``settings`` (e.g. those set on the command
    line) taking precedence over its switches.

    Switching LSA off by hand also switches off the dynamic auxiliary weights that come from it, and
    switching the auxiliary branches off also switches off knowledge synergy, unless those are set too.
    Own data (``data=PATH``) leaves ``flag`` empty unless it is set (validate then refuses the pair).
    """
    if variant not in VARIANTS:
      raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if settings.get("data") and "flag" not in settings:
      settings = {**settings, "flag": ""}  # own data replaces the default MedMNIST flag
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
  def data_seed(self) -> int:
    """The seed of the data draws (labelled subset, drawn splits): --label-seed, else --seed."""
    return self.seed if self.label_seed is None else self.label_seed

  def validation_interval(self, num_train: int, num_val: int, num_test: int) -> int:
    """--eval-every, or its auto value for these split sizes (see EVAL_IMAGES_PER_TRAIN_IMAGE); validation
    also runs at the last epoch, so N >= --epochs validates only there."""
    if self.eval_every:
      return self.eval_every
    budget = EVAL_IMAGES_PER_TRAIN_IMAGE * self.epochs * num_train - num_test
    for every in range(1, self.epochs):
      passes = self.epochs // every + (self.epochs % every != 0)
      if passes * num_val <= budget:
        return every
    return self.epochs

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
    self._validate_data()
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

  def _validate_data(self) -> None:
    """--flag or --data, and the options that go with each."""
    if self.data:
      if self.flag:
        raise ValueError(f"--data and --flag both name a data set; drop --flag {self.flag} to train on --data "
                         "(in Python: TrainConfig(data=..., flag=''))")
      if self.source != "npz":
        raise ValueError("--source tfds reads a MedMNIST --flag; --data is read directly: drop --source")
      if self.num_classes == 1:
        raise ValueError("--num-classes must be at least 2 (or 0 to infer it)")
      return
    if check_flag(self.flag).get("builtin") and self.source == "tfds":
      raise ValueError(f"--source tfds reads the 12 MedMNIST data sets; {self.flag!r} is built in: drop --source")
    for name in ("task", "num_classes"):
      if getattr(self, name):
        raise ValueError(f"--{name.replace('_', '-')} describes --data; a MedMNIST --flag has its own")
