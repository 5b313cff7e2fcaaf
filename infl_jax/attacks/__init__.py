"""Attacks on federated updates and trained models: gradient inversion (DLG/iDLG), the analytic
first-layer attack, the adaptive key-vector attacker, membership inference, and reconstruction metrics."""

from infl_jax.attacks.adaptive import apply_with_key_vector, fit_key_vector, prior_key_vector
from infl_jax.attacks.analytic import analytic_ratios, find_first_layer, recover_first_layer_input
from infl_jax.attacks.gradient_inversion import (InversionConfig, InversionResult, gradient_match_loss, idlg_label,
                                                 invert, normalized_gd, simulated_update_fn,
                                                 soft_cross_entropy)
from infl_jax.attacks.membership import (attack_metrics, lira_scores, logit_confidence, loss_threshold_scores,
                                         roc_auc, shadow_membership, tpr_at_fpr, train_shadow_models)
from infl_jax.attacks.metrics import image_metrics, omics_metrics, summarise, top_k_overlap

__all__ = [
    "InversionConfig", "InversionResult", "analytic_ratios", "apply_with_key_vector", "attack_metrics",
    "find_first_layer", "fit_key_vector", "gradient_match_loss", "idlg_label", "image_metrics", "invert",
    "lira_scores", "logit_confidence", "loss_threshold_scores", "normalized_gd", "omics_metrics", "prior_key_vector",
    "recover_first_layer_input", "roc_auc", "shadow_membership", "simulated_update_fn", "soft_cross_entropy", "summarise", "top_k_overlap",
    "tpr_at_fpr", "train_shadow_models",
]
