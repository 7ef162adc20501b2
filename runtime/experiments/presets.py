"""Named ``salt reproduce`` experiments: the paper's runs and the CPU-sized reproductions.

Each entry is a complete :class:`ReproduceConfig`; the CLI picks one with ``--size`` and
overrides single fields with its flags.  Why the CPU sizes are what they are (every
configuration tried, with its cost and outcome) is in ``docs/reproduction.md``.
"""
from __future__ import annotations

import dataclasses

from salt.reference.config import PAPER_K, PAPER_OMEGA, PAPER_RHO
from salt.reference.schedule import TRANSITIONS


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    out: str = "salt-reproduce"
    data: str | None = None          # existing token store; default OUT/data (prepared)
    size: str = "small"
    teacher_preset: str = "small-teacher"
    student_preset: str = "small-student"
    steps: int = 600                 # student steps n
    kd_steps: int = 100              # n_kd (paper: 36K of 208K = 17%)
    teacher_steps: int = 600
    teacher_batch: int | None = 32   # the SLM's batch (None: the students' batch)
    early_step: int = 100            # early SLM checkpoint used for scoring
    batch: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    final_lr: float = 3e-4
    warmup: int = 30
    optimizer: str = "adamw"
    omega: float = PAPER_OMEGA
    rho: float = PAPER_RHO           # the ρ of the lead arm (its verdicts lead the report)
    extra_rhos: tuple = ()           # more ρ arms (RKD, SALT, SALT_DS each) sharing SLM, selection, BASELINE
    rho_searched: bool = False       # the lead ρ was chosen by search at this scale (on tuning seeds)
    transition: str = "step"
    kd_steps1: int | None = None     # end of the constant-ω part for the linear transitions
    k: int = PAPER_K
    candidates: int | None = 4096    # windows scored for SALT_DS (None: the whole pool)
    eval_every: int = 100
    eval_windows: int = 512
    eval_batch: int = 32
    seed: int = 0                    # seed of the SLM and of the first student seed
    seeds: int = 1                   # student seeds: seed, seed + 1, ...
    vocab_size: int | None = 4096    # for data preparation (None: the data layer's default)
    overhead_iters: int = 6          # interleaved KD / standard step timings (salt bench step)
    claims_testable: bool = True     # False: the report says the size is too small to test
    side_by_side: bool = True        # students two at a time, one core each (else sequential)
    kd_topk: int | None = None       # top-K KD (paper eq. 13-14) for every KD run; None: full vocabulary
    teacher_cache: bool = False      # KD from teacher caches built once from the SLM (implies top-K KD)
    teacher: str | None = None       # a given SLM run (e.g. `salt import hf`): used instead of training one
    early_teacher: str | None = None  # with teacher: the run that scores for SALT_DS (None: no selection)

    def student_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def rhos(self) -> list[float]:
        """Every ρ arm, the lead one first."""
        return [self.rho, *self.extra_rhos]

    def validate(self) -> None:
        for name in ("steps", "kd_steps", "teacher_steps", "early_step", "batch", "seq_len",
                     "eval_every", "eval_windows", "eval_batch", "k", "seeds", "overhead_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.teacher_batch is not None and (not isinstance(self.teacher_batch, int)
                                               or self.teacher_batch < 1):
            raise ValueError(f"teacher_batch must be a positive integer, got {self.teacher_batch!r}")
        if self.kd_steps >= self.steps:
            raise ValueError(f"kd_steps ({self.kd_steps}) must be < steps ({self.steps}) for SALT")
        if self.early_step >= self.teacher_steps:
            raise ValueError(f"early_step ({self.early_step}) must be < teacher_steps "
                             f"({self.teacher_steps})")
        for name in ("steps", "kd_steps"):
            if getattr(self, name) % self.eval_every:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of eval_every "
                                 f"({self.eval_every}) so that its checkpoint is kept")
        if self.teacher_steps % self.early_step:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of "
                             f"early_step ({self.early_step})")
        if not 0.0 <= self.omega <= 1.0:
            raise ValueError(f"omega must be in [0, 1], got {self.omega}")
        for r in self.rhos():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
                raise ValueError(f"rho must be > 0, got {r!r}")
        if len(set(self.rhos())) != len(self.rhos()):
            raise ValueError(f"rho values must be distinct, got {', '.join(f'{r:g}' for r in self.rhos())}")
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, got {self.transition!r}")
        if self.transition != "step" and self.kd_steps1 is None:
            raise ValueError(f"transition {self.transition!r} needs kd_steps1 (end of constant ω)")
        if self.kd_topk is not None and (isinstance(self.kd_topk, bool) or not isinstance(self.kd_topk, int)
                                         or self.kd_topk < 1):
            raise ValueError(f"kd_topk must be a positive integer, got {self.kd_topk!r}")
        if self.teacher_cache and self.kd_topk is None:
            raise ValueError("teacher_cache holds the teacher's top-K only: it needs kd_topk (top-K KD)")
        if self.early_teacher is not None and self.teacher is None:
            raise ValueError("early_teacher scores for SALT_DS beside a given teacher: it needs teacher")
        if self.teacher is not None and self.data is None:
            raise ValueError("a given teacher needs data: the token store prepared with the teacher's "
                             "tokenizer (salt data prepare --tokenizer)")
        if self.warmup > min(self.steps, self.teacher_steps):
            raise ValueError(f"warmup ({self.warmup}) must be <= steps and teacher_steps")


# The seeds the search of the default's ρ and SLM budget used (docs/reproduction.md rows R3-R5):
# R3 ran on seed 0 (exploratory), R4 and R5 on tuning seed 101.  The default's verdicts use other
# seeds (its first seed is 1); the report says so, or warns when a run uses one of these.
SEARCH_SEEDS = (0, 101)

SIZES = {
    # The default (``--size small``): SALT at ρ = 1, chosen by search at this scale together with
    # the SLM's budget (batch 8; on tuning seed 101, docs/reproduction.md rows R3-R5), as the paper
    # chose ρ = 0.25 at its own scale; beside it the paper's ρ = 0.25 arm (RKD, SALT, SALT_DS at
    # ρ = 0.25) sharing the SLM, the selection and BASELINE.  At ρ = 0.25 SALT ends worse than
    # BASELINE at this scale (rows R1 and "small"): the SLM's target is near-uniform there.
    "small": ReproduceConfig(size="small", rho=1.0, extra_rhos=(PAPER_RHO,), rho_searched=True,
                             teacher_batch=8, seed=1),
    # 4x the student compute (SLM small-teacher, students repro-student: 4L d192 MQA, 720 steps of
    # 32 x 128 tokens, n_kd = 120): 1 h 45 min measured on 2 CPU cores, and SALT still ends worse
    # than BASELINE (+0.040 nats; docs/reproduction.md, row "medium").
    "medium": ReproduceConfig(size="medium", student_preset="repro-student", steps=720, kd_steps=120,
                              teacher_steps=720, teacher_batch=None, early_step=120, batch=32,
                              seq_len=128, warmup=36, eval_every=60),
    # The ablation that shows the paper's pattern at CPU scale: --size small with ρ = 1 (the paper's
    # ρ = 0.25 leaves this small LM's target near-uniform) and an SLM trained on a quarter of
    # small's SLM tokens, so that it ends worse than BASELINE as in the paper.  About 13 minutes;
    # chosen on tuning seed 101, confirmed on seeds 1-3 (docs/reproduction.md, rows R3-R5).
    "small-rho1": ReproduceConfig(size="small-rho1", rho=1.0, teacher_batch=8, seed=1),
    # A smoke run (a few minutes): the whole pipeline, far too small to test any claim.
    "quick": ReproduceConfig(size="quick", steps=150, kd_steps=25, teacher_steps=150,
                             early_step=25, teacher_batch=16, batch=8, warmup=8, eval_every=25,
                             eval_windows=128, candidates=1024, overhead_iters=3,
                             claims_testable=False),
    # For the test suite: tiny presets, a handful of steps.
    "tiny": ReproduceConfig(size="tiny", teacher_preset="tiny-teacher", student_preset="tiny-student",
                            steps=8, kd_steps=4, teacher_steps=8, teacher_batch=None, early_step=4,
                            batch=4, seq_len=16, lr=1e-2, final_lr=1e-3, warmup=2, eval_every=2,
                            eval_windows=12, eval_batch=4, candidates=None, vocab_size=None,
                            overhead_iters=1, claims_testable=False),
    # The paper's runs (docs/design.md §3, §5, §6): for an accelerator, not a CPU.  The SLM's
    # own budget and the scoring checkpoint are not given there: assumed n and n_kd steps.
    "paper-2.8b": ReproduceConfig(size="paper-2.8b", teacher_preset="paper-1.5b",
                                  student_preset="paper-2.8b", steps=208_000, kd_steps=36_000,
                                  teacher_steps=208_000, teacher_batch=None, early_step=4_000,
                                  batch=2048, seq_len=1280, lr=1e-3, final_lr=1e-4, warmup=4_000,
                                  optimizer="adafactor", eval_every=4_000, eval_windows=4096,
                                  candidates=None, vocab_size=None),
    "paper-8.6b": ReproduceConfig(size="paper-8.6b", teacher_preset="paper-2.8b",
                                  student_preset="paper-8.6b", steps=208_000, kd_steps=36_000,
                                  teacher_steps=208_000, teacher_batch=None, early_step=4_000,
                                  batch=2048, seq_len=1280, lr=1e-3, final_lr=1e-4, warmup=4_000,
                                  optimizer="adafactor", eval_every=4_000, eval_windows=4096,
                                  candidates=None, vocab_size=None),
}


def config_for(size: str, **overrides) -> ReproduceConfig:
    """The size's config with ``overrides`` (None: keep). ``rho`` may be a list: the lead ρ
    first, the other arms after it. The lead ρ counts as searched only if it is the size's."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("rho"), (list, tuple)):
        rhos = [float(r) for r in overrides["rho"]]
        if not rhos:
            raise ValueError("rho needs at least one value")
        overrides["rho"], overrides["extra_rhos"] = rhos[0], tuple(rhos[1:])
    base = SIZES[size]
    if "rho" in overrides and overrides["rho"] != base.rho:
        overrides["rho_searched"] = False
    cfg = dataclasses.replace(base, **overrides)
    cfg.validate()
    return cfg
