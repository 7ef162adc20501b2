"""NumPy/Numba reference implementation of SALT: it defines the golden values.

Public entry points (kept stable for the kernels, the runtime and users):
``kd_loss``, ``kd_loss_grad``, ``selection_score``, ``omega_at``, ``param_count``,
``get_preset`` / ``PRESETS``, ``ModelConfig``. The model, optimisers, trainer and golden
files live in ``salt.reference.model``, ``.optim``, ``.trainer`` and ``.golden``.
"""
from salt.reference.config import (  # noqa: F401
    PRESETS,
    ModelConfig,
    flatten_params,
    get_preset,
    param_count,
    param_shapes,
    unflatten_params,
)
from salt.reference.losses import (  # noqa: F401
    ce_loss,
    ce_loss_grad,
    kd_loss,
    kd_loss_grad,
    kl_monitor,
    log_softmax,
    loss_parts,
    mean_over_mask,
    topk_indices,
    topk_kd_loss,
    topk_kd_loss_grad,
)
from salt.reference.schedule import lr_at, lr_values, omega_at, omega_values  # noqa: F401
from salt.reference.score import selection_score, token_costs, top_m_indices  # noqa: F401
from salt.reference.score_numba import selection_score_numba, token_costs_numba  # noqa: F401
