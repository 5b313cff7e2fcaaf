"""LSANet assembly: backbone + auxiliary branches + LSA fused head (docs/design.md, "LSANet").

Heads, in order: `aux1..auxK` (one per attachment stage), `main`, and `fused` when LSA is on.
DKS-style auxiliary branches are fresh copies of all backbone stages after the attachment stage,
each with its own pooling and classifier; the light option is a 1x1 conv head instead.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lsanet_jax.backbones import backbone_spec
from lsanet_jax.lsa import LayerSelectiveAttention, LightAuxHead, LinearHead

AUX_KINDS = ("none", "dks", "light")


def default_aux_stages(num_stages: int) -> tuple[int, ...]:
  """1-based stages that get an auxiliary branch by default: the two before the last one
  (DKS puts its branches on ResNet's conv3_x and conv4_x, i.e. stages 2 and 3 of 4)."""
  return tuple(s for s in (num_stages - 2, num_stages - 1) if s >= 1)


class LSANet(nn.Module):
  """Returns {"logits": {head: (N, classes)}, "lsa_alpha": (N, L, d) or None}."""
  backbone: str
  num_classes: int
  stem: str = "28"
  width: float = 1.0
  attention: str = "none"
  aux: str = "none"  # none | dks | light
  aux_stages: Sequence[int] | None = None  # 1-based; None: default_aux_stages
  lsa: bool = False
  lsa_dim: int = 128
  lsa_reduction: int = 4
  dtype: jnp.dtype = jnp.float32

  def resolved_aux_stages(self) -> tuple[int, ...]:
    spec = backbone_spec(self.backbone, stem=self.stem, width=self.width, attention=self.attention)
    return resolve_aux_stages(self.aux, self.aux_stages, spec.num_stages)

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = backbone_spec(self.backbone, stem=self.stem, width=self.width,
                         attention=self.attention, dtype=self.dtype)
    aux_stages = resolve_aux_stages(self.aux, self.aux_stages, spec.num_stages)
    if self.lsa and not aux_stages:
      raise ValueError("LSA fuses the auxiliary branches with the main one: enable auxiliary "
                       "branches (aux='dks' or 'light') or switch LSA off")
    x = x.astype(self.dtype)
    x = spec.make_stem("stem")(x, train)
    logits, pooled = {}, []
    for i in range(spec.num_stages):
      x = spec.make_stage(i, f"stage{i + 1}")(x, train)
      if (i + 1) in aux_stages:
        k = aux_stages.index(i + 1) + 1
        if self.aux == "dks":
          y = x
          for j in range(i + 1, spec.num_stages):
            y = spec.make_stage(j, f"aux{k}_stage{j + 1}")(y, train)
          logits[f"aux{k}"], feature = LinearHead(self.num_classes, self.dtype,
                                                  name=f"aux{k}_head")(y)
        else:
          logits[f"aux{k}"], feature = LightAuxHead(self.num_classes, spec.stage_features[-1],
                                                    self.dtype, name=f"aux{k}_head")(x, train)
        pooled.append(feature)
    logits["main"], feature = LinearHead(self.num_classes, self.dtype, name="head")(x)
    pooled.append(feature)
    alpha = None
    if self.lsa:
      logits["fused"], alpha = LayerSelectiveAttention(
          self.num_classes, self.lsa_dim, self.lsa_reduction, self.dtype, name="lsa")(pooled, train)
    return {"logits": logits, "lsa_alpha": alpha}


def resolve_aux_stages(aux: str, aux_stages, num_stages: int) -> tuple[int, ...]:
  if aux not in AUX_KINDS:
    raise ValueError(f"unknown auxiliary branch kind {aux!r}; choose one of {', '.join(AUX_KINDS)}")
  if aux == "none":
    return ()
  stages = tuple(sorted(set(aux_stages))) if aux_stages else default_aux_stages(num_stages)
  bad = [s for s in stages if not 1 <= s < num_stages]
  if bad:
    raise ValueError(f"auxiliary branches can attach after stages 1..{num_stages - 1} of this "
                     f"backbone (the last stage feeds the main head), got {bad}")
  return stages


def head_names(aux_stages: Sequence[int], lsa: bool) -> list[str]:
  return [f"aux{k + 1}" for k in range(len(aux_stages))] + ["main"] + (["fused"] if lsa else [])
