"""The PyTorch references the benchmarks time our JAX code against.

- ``ProteomicsNet``: the keyed proteomics network of ``infl_jax.models.make_proteomics_net`` in
  PyTorch, with the same layers, sizes and parameter count (docs/design.md, "Keyed layers"),
  and ``ReferenceFedAvg``, FedAvg the way the reference implementation trains it (infl_round.py).
- ``resnet18``: ResNet-18 with MedMNIST's 28-px stem (lsanet_speed.py).

This module imports torch: the benchmarks import it only inside their PyTorch sections, so their
``--no-torch`` paths run where torch is not installed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from infl_jax import models
from infl_jax.keyed.dense import KEY_HIDDEN
from infl_jax.keyed.encoder import COORD_DIM, ENCODER_HIDDEN, KEY_DIM
from infl_jax.keyed.film import FILM_HIDDEN

__all__ = ["ProteomicsNet", "ReferenceFedAvg", "ReferenceState", "resnet18"]


# ------------------------------------------------------------------------------------------------
# The keyed proteomics network.


def _small_output_layer(fan_in: int, fan_out: int) -> nn.Linear:
  """A linear layer with N(0, 0.02) weights and a zero bias."""
  layer = nn.Linear(fan_in, fan_out)
  nn.init.normal_(layer.weight, std=0.02)
  nn.init.zeros_(layer.bias)
  return layer


def _batch_norm(features: int) -> nn.BatchNorm1d:
  # Flax's momentum is PyTorch's 1 - momentum.
  return nn.BatchNorm1d(features, eps=models.BATCH_NORM_EPSILON, momentum=1 - models.BATCH_NORM_MOMENTUM)


class KeyEncoder(nn.Module):
  """The secret coordinates [M, 2] -> the key vector k [KEY_DIM]."""

  def __init__(self):
    super().__init__()
    self.W1, self.W2 = nn.Linear(COORD_DIM, ENCODER_HIDDEN), nn.Linear(ENCODER_HIDDEN, KEY_DIM)
    self.norm = nn.LayerNorm(KEY_DIM)

  def forward(self, coords):
    return self.norm(F.silu(self.W2(F.silu(self.W1(coords))))).mean(0)


class FiLM(nn.Module):
  """Activation-dependent FiLM: h * (1 + lam tanh gamma) + lam tanh beta, gamma and beta from (h, k)."""

  def __init__(self, features: int, key_strength: float):
    super().__init__()
    self.key_strength = key_strength
    self.A, self.norm = nn.Linear(features, KEY_DIM), nn.LayerNorm(KEY_DIM)
    self.F1, self.F2 = nn.Linear(3 * KEY_DIM, FILM_HIDDEN), _small_output_layer(FILM_HIDDEN, 2 * features)

  def forward(self, h, k):
    lam = self.key_strength
    a = self.norm(F.silu(self.A(h)))
    k = k.expand_as(a)
    gamma, beta = self.F2(F.silu(self.F1(torch.cat([a, k, a * k], -1)))).chunk(2, -1)
    return h * (1 + lam * torch.tanh(gamma)) + lam * torch.tanh(beta)


class KeyedLinear(nn.Module):
  """The reference keyed layer: W_eff = diag(1 + lam tanh s) W, b_eff = b + lam tanh t, then FiLM."""

  def __init__(self, fan_in: int, fan_out: int, key_strength: float, film: bool = True):
    super().__init__()
    self.key_strength = key_strength
    self.linear = nn.Linear(fan_in, fan_out)
    self.V1, self.norm = nn.Linear(KEY_DIM, KEY_HIDDEN), nn.LayerNorm(KEY_HIDDEN)
    self.V2 = _small_output_layer(KEY_HIDDEN, 2 * fan_out)
    self.film = FiLM(fan_out, key_strength) if film else None

  def forward(self, x, k):
    lam = self.key_strength
    s, t = self.V2(self.norm(F.silu(self.V1(k)))).chunk(2, -1)
    weight = self.linear.weight * (1 + lam * torch.tanh(s))[:, None]
    y = F.linear(x, weight, self.linear.bias + lam * torch.tanh(t))
    return self.film(y, k) if self.film is not None else y


class ResidualBlock(nn.Module):
  def __init__(self, features: int, key_strength: float, dropout: float):
    super().__init__()
    self.dense_0, self.bn_0 = KeyedLinear(features, features, key_strength), _batch_norm(features)
    self.dense_1, self.bn_out = KeyedLinear(features, features, key_strength), _batch_norm(features)
    self.dropout = nn.Dropout(dropout)

  def forward(self, h, k):
    y = self.dropout(F.relu(self.bn_0(self.dense_0(h, k))))
    return F.relu(self.bn_out(h + self.dense_1(y, k)))


class ProteomicsNet(nn.Module):
  """``make_proteomics_net``'s network: keyed embed, residual blocks, keyed bottleneck, keyed head."""

  def __init__(self, features: int, num_classes: int, *, key_strength: float, dropout: float,
               num_blocks: int = 2, hidden: int = 64, bottleneck: int = 32):
    super().__init__()
    self.key_encoder = KeyEncoder()
    self.embed = KeyedLinear(features, hidden, key_strength)
    self.blocks = nn.ModuleList([ResidualBlock(hidden, key_strength, dropout) for _ in range(num_blocks)])
    self.bottleneck = KeyedLinear(hidden, bottleneck, key_strength)
    self.head = KeyedLinear(bottleneck, num_classes, key_strength, film=False)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x, coords):
    k = self.key_encoder(coords)
    h = self.embed(x, k)
    for block in self.blocks:
      h = block(h, k)
    return self.head(self.dropout(F.relu(self.bottleneck(h, k))), k)


# ------------------------------------------------------------------------------------------------
# FedAvg, the reference implementation's way.


class ReferenceState(NamedTuple):
  """The server side of ``ReferenceFedAvg``: the global ``state_dict`` and the rounds done."""

  global_state: dict[str, torch.Tensor]
  round: int


class ReferenceFedAvg:
  """One round: per client load the global ``state_dict``, a new optimizer, local epochs of shuffled
  minibatches, collect the ``state_dict``; then their average weighted by sample count (BatchNorm
  statistics included). ``round(state, clients, coords)`` has the signature of our engine's round."""

  def __init__(self, make_model: Callable[[], nn.Module], *, optimizer: str, learning_rate: float,
               weight_decay: float, local_epochs: int, batch_size: int, seed: int):
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if self.device.type == "cpu":
      # Minibatches of 32 gain nothing from intra-op threads, and on shared cores OpenMP's
      # spinning made the timings swing 10x from run to run.
      torch.set_num_threads(1)
    torch.manual_seed(seed)
    self.initial_model = make_model().to(self.device)
    self.local_model = make_model().to(self.device)
    self.optimizer_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    self.learning_rate, self.weight_decay = learning_rate, weight_decay
    self.local_epochs, self.batch_size = local_epochs, batch_size

  def init(self) -> ReferenceState:
    return ReferenceState({name: v.detach().clone() for name, v in self.initial_model.state_dict().items()}, 0)

  def tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(array, device=self.device, dtype=dtype)

  def clients(self, x: np.ndarray, y: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-client tensors on the device (the reference keeps them on the host: this only helps it)."""
    xs = [self.tensor(x[c]) for c in range(x.shape[0])]
    ys = [self.tensor(y[c], torch.long) for c in range(y.shape[0])]
    self.synchronize()
    return xs, ys

  def synchronize(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def close(self) -> None:
    """Frees the models' device memory, for what runs next on the accelerator."""
    self.initial_model = self.local_model = None
    if self.device.type == "cuda":
      torch.cuda.empty_cache()

  def local_training(self, global_state: dict, x: torch.Tensor, y: torch.Tensor, coords: torch.Tensor) -> dict:
    model = self.local_model
    model.load_state_dict(global_state)
    optimizer = self.optimizer_class(model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
    model.train()
    n = x.shape[0]
    batch = min(self.batch_size, n)
    for _ in range(self.local_epochs):
      order = torch.randperm(n, device=self.device)
      for start in range(0, n, batch):
        rows = order[start:start + batch]
        if rows.numel() < 2:  # BatchNorm cannot train on one sample
          continue
        loss = F.cross_entropy(model(x[rows], coords), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}

  def round(self, state: ReferenceState, clients: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
            coords: torch.Tensor) -> tuple[ReferenceState, dict]:
    xs, ys = clients
    collected = [self.local_training(state.global_state, x, y, coords) for x, y in zip(xs, ys)]
    weights = torch.tensor([x.shape[0] for x in xs], dtype=torch.float32, device=self.device)
    weights = weights / weights.sum()
    averaged = {}
    for name, value in state.global_state.items():
      if value.is_floating_point():
        stacked = torch.stack([client_state[name] for client_state in collected])
        averaged[name] = (stacked * weights.view(-1, *([1] * value.dim()))).sum(0)
      else:  # BatchNorm's num_batches_tracked
        averaged[name] = collected[0][name]
    return ReferenceState(averaged, state.round + 1), {}


# ------------------------------------------------------------------------------------------------
# ResNet-18 for LSANet's comparison.


class BasicBlock(nn.Module):
  """torchvision's ResNet BasicBlock."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def resnet18(num_classes: int, width: float = 1.0) -> tuple[nn.Module, str]:
  """ResNet-18 with MedMNIST's 28-px stem (3x3 stride-1 conv, no max-pool) and its description:
  torchvision's when it is importable and ``width`` is 1, else an identical hand-written one (that
  also takes a width multiplier)."""
  if width == 1.0:
    try:
      import torchvision
    except ImportError:
      pass
    else:
      model = torchvision.models.resnet18(num_classes=num_classes)
      model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      model.maxpool = nn.Identity()
      return model, f"torchvision {torchvision.__version__} resnet18, 28-px stem"

  widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
  layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
  cin = widths[0]
  for stage, cout in enumerate(widths):
    layers += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
    cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers), f"hand-written torch ResNet-18 (torchvision layout), 28-px stem, width {width}"
