"""Privacy of INFL: DP-FedAvg as a training mode, the hardened (input-scrambling) variant, and the
privacy evaluation behind ``infl-privacy`` (gradient inversion, analytic and membership attacks)."""
