"""salt.runtime: the sharded JAX trainer and the tools built on it.

* ``model``: the pure-JAX transformer (``init_params``, ``forward``, ``hidden``; layers under
  ``lax.scan``), analytic FLOP counts.
* ``losses``: per-position CE / KD losses and the ω schedule in ``jnp``.
* ``optim``: Adafactor / AdamW directions, global-norm clipping, warm-up + cosine ``lr_at``.
* ``sharding``: the ``("data", "model")`` mesh and the partition rules.
* ``checkpoint``: orbax checkpoints of a run; ``load_params`` for teachers, eval and scoring.
* ``train``: ``TrainConfig`` and ``train`` (BASELINE / RKD / SALT / SALT_DS).
* ``score``, ``evaluate``, ``reproduce``, ``report``: selection scores, evaluation, the paper's
  comparison end to end.
"""
