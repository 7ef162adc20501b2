"""NumPy/Numba reference implementation of SALT: it defines the golden values.

Public entry points (kept stable for the kernels, the runtime and users):
``kd_loss``, ``kd_loss_grad``, ``selection_score``, ``omega_at``, ``param_count``,
``get_preset`` / ``PRESETS``, ``ModelConfig``.
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

# Modules added by the reference work export their public names here.
try:  # losses / score / schedule land with the reference issue
    from salt.reference.losses import (  # noqa: F401
        ce_loss, ce_loss_grad, kd_loss, kd_loss_grad, kl_monitor, topk_kd_loss, topk_kd_loss_grad)
    from salt.reference.score import selection_score, selection_score_numpy  # noqa: F401
    from salt.reference.schedule import lr_at, omega_at  # noqa: F401
except ImportError:  # pragma: no cover - removed once those modules exist
    pass
