"""LSANet in JAX: deeply supervised layer selective attention networks for MedMNIST.

Import the pieces into your own Flax code:

  from lsanet_jax.models import LSANet                 # backbone + aux branches + LSA head
  from lsanet_jax.lsa import LayerSelectiveAttention   # the LSA fusion module alone
  from lsanet_jax.losses import lsanet_loss, knowledge_synergy_loss, dynamic_aux_weights
  from lsanet_jax.metrics import evaluate               # official MedMNIST ACC/AUC
  from lsanet_jax.data import load_medmnist, load_own_data  # MedMNIST npz; your npz or image folder
"""
__version__ = "0.1.0"
