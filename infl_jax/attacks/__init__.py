"""Attacks on federated updates and trained models: gradient inversion (DLG/iDLG), the analytic
first-layer attack, the adaptive key-vector attacker, membership inference, reconstruction metrics, and
the attacks on the hardened scheme's scramble (the public-panel attacker, brute force over seed-derived keys) and
on any orthogonal input transform (covariance alignment, which the mixed scheme's blocks do not stop)."""

from infl_jax.attacks.adaptive import apply_with_key_vector, fit_key_vector, prior_key_vector
from infl_jax.attacks.analytic import analytic_ratios, find_first_layer, recover_first_layer_input
from infl_jax.attacks.covariance_alignment import Alignment, align_covariance, feature_identity
from infl_jax.attacks.gradient_inversion import (InversionConfig, InversionResult, gradient_match_loss, idlg_label,
                                                 invert, normalized_gd, simulated_update_fn,
                                                 soft_cross_entropy)
from infl_jax.attacks.membership import (attack_metrics, lira_scores, logit_confidence, loss_threshold_scores,
                                         roc_auc, shadow_membership, tpr_at_fpr, train_shadow_models)
from infl_jax.attacks.metrics import image_metrics, omics_metrics, summarise, top_k_overlap
from infl_jax.attacks.public_panel import (PanelConfig, PanelMatch, common_scale_inputs, match_accuracy,
                                           public_panel_attack, public_prior, random_scrambler)
from infl_jax.attacks.seed_search import SeedSearch, search_seeds, seconds_to_enumerate, seed_candidates, v1_scrambler

__all__ = [
    "Alignment", "InversionConfig", "InversionResult", "PanelConfig", "PanelMatch", "SeedSearch", "align_covariance",
    "analytic_ratios", "apply_with_key_vector", "attack_metrics", "common_scale_inputs", "feature_identity",
    "find_first_layer", "fit_key_vector", "gradient_match_loss", "idlg_label", "image_metrics", "invert",
    "lira_scores", "logit_confidence", "loss_threshold_scores", "match_accuracy", "normalized_gd", "omics_metrics",
    "prior_key_vector", "public_panel_attack", "public_prior", "random_scrambler", "recover_first_layer_input",
    "roc_auc", "search_seeds", "seconds_to_enumerate", "seed_candidates", "shadow_membership",
    "simulated_update_fn", "soft_cross_entropy", "summarise", "top_k_overlap", "tpr_at_fpr", "train_shadow_models",
    "v1_scrambler",
]
