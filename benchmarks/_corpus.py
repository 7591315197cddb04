"""The labelled corpus: which tiny trainings, how they are split, and their on-disk cache.

Each entry is a name, a family (what the scenario is for), the generator and its parameters,
and its part (``tune`` or ``holdout``: some seeds of every family and some whole families are
held out). Points are cached under ``.corpus-cache/`` keyed by a hash of the generating code
and the parameters, so rescoring takes seconds; labels are computed at load time from the
points (``tests/client/_corpus_labels.py``), so changing a labelling rule needs no regeneration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "client"))

CACHE = ROOT / ".corpus-cache"
#: The code that makes the points: a change to any of them regenerates the corpus.
SOURCES = [
    ROOT / "tests" / "client" / f for f in ("_detector_scenarios.py", "_corpus_runs.py", "_continual_training.py")
]
#: ... and, for the runs of these generators only, this code too (so that a change to a new
#: generator regenerates its own runs, not the whole corpus).
PLATEAU_SOURCES = [ROOT / "tests" / "client" / "_corpus_runs_plateau.py"]
LAYERS_SOURCES = [ROOT / "tests" / "client" / "_corpus_runs_layers.py"]
DEAD_SOURCES = [ROOT / "tests" / "client" / "_corpus_runs_dead.py", *LAYERS_SOURCES]
RANKS_SOURCES = [ROOT / "tests" / "client" / "_corpus_runs_ranks.py", ROOT / "client" / "_ranks.py"]
GEN_SOURCES = {
    "stuck": PLATEAU_SOURCES,
    "edge": PLATEAU_SOURCES,
    "held_out": PLATEAU_SOURCES,
    "layers": LAYERS_SOURCES,
    "ranks": RANKS_SOURCES,
    "dead": DEAD_SOURCES,
    "perf": DEAD_SOURCES,
}


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    family: str  # what it is for; "healthy_*" families are expected to raise nothing
    gen: str  # minibatch | continual | gd | modular | stuck | edge | held_out | layers | ranks | dead | perf
    params: dict
    part: str = "tune"
    divergence: str = "gradual"  # the tag a non-finite step gets: gradual or sudden

    @property
    def healthy(self) -> bool:
        return self.family.startswith("healthy")


def _mb(family, part_by_seed, divergence="gradual", **params):
    return [
        Run(f"{family}_s{seed}", family, "minibatch", {**params, "seed": seed}, part, divergence)
        for seed, part in part_by_seed.items()
    ]


TUNE2_HOLD1 = {0: "tune", 1: "tune", 2: "holdout"}
TUNE1_HOLD1 = {0: "tune", 1: "holdout"}
HOLD2 = {0: "holdout", 1: "holdout"}

WARMUP_TOO_HIGH = {"lr": 0.05, "warmup": 300, "peak": 3.0}
HEALTHY_WARMUP_COSINE = {"lr": 3e-3, "warmup": 100, "cosine": True}


def _runs(gen, family, part_by_seed, **params):
    return [
        Run(f"{family}_s{seed}", family, gen, {**params, "seed": seed}, part) for seed, part in part_by_seed.items()
    ]


TUNE2_HOLD2 = {0: "tune", 1: "tune", 2: "holdout", 3: "holdout"}
EDGE_SWITCH = {"before": 30, "steps": 400}


def _issue17() -> list[Run]:
    """Stuck runs (a plateau at the starting loss), softmax regressions pushed past the edge of
    stability (the loss alternating with a growing swing; with curvature sent, under its edge
    alert), small training sets that overfit a held-out set, and their healthy counterparts."""
    return [
        *_runs("stuck", "plateau_lr_too_low_sgdm_mlp_b32", TUNE1_HOLD1, kind="lr_low", lr=1e-5),
        *_runs("stuck", "plateau_dead_relu_sgdm_mlp_b32", TUNE1_HOLD1, kind="dead"),
        *_runs("stuck", "plateau_vanishing_init_sgdm_tanh_b32", TUNE1_HOLD1, kind="saddle"),
        *_runs("edge", "osc_gd_past_edge_softmax", TUNE2_HOLD2, factor=1.2, **EDGE_SWITCH),
        *_runs("edge", "osc_gd_far_past_edge_softmax", TUNE1_HOLD1, factor=1.5, **EDGE_SWITCH),
        *_runs("edge", "osc_gd_past_edge_curvature_softmax", TUNE1_HOLD1, factor=1.2, curvature=True, **EDGE_SWITCH),
        *_runs("held_out", "overfit_small_train_adam_mlp", TUNE2_HOLD1, n_train=200, flip=0.2),
        *_runs("held_out", "overfit_small_train_noisy_adam_mlp", TUNE1_HOLD1, n_train=300, flip=0.3),
        *_runs("held_out", "overfit_small_train_sgdm_mlp", HOLD2, n_train=200, opt="sgdm", lr=0.05),
        *_runs("edge", "healthy_gd_below_edge_softmax", TUNE1_HOLD1, factor=0.9, **EDGE_SWITCH),
        *_runs(
            "edge", "healthy_gd_momentum_below_edge_softmax", {0: "holdout"}, factor=0.9, momentum=0.5, **EDGE_SWITCH
        ),
        *_runs("held_out", "healthy_held_out_adam_mlp", TUNE1_HOLD1, n_train=4000, flip=0.2),
        *_runs("held_out", "healthy_held_out_sgdm_mlp", {0: "holdout"}, n_train=20000, opt="sgdm", lr=0.05, width=64),
    ]


def _layers() -> list[Run]:
    """Per-layer gradients: deep sigmoid and tanh stacks vanishing from the start, a layer
    whose ReLUs all die at step 400, a layer frozen by weights grown x300 under the
    normalisation after it (its gradient /300), a layer held by a max-norm constraint 300-1000x
    below its norm (its gradient x100-x300, the loss and the global norm barely moved); and
    healthy deep ReLU, tanh, LayerNorm and BatchNorm networks, a CNN and a transformer."""
    adam = {"opt": "adam", "lr": 1e-3}
    cosine = {"opt": "adamw", "schedule": HEALTHY_WARMUP_COSINE}
    maxnorm = {"kind": "maxnorm", "init_scale": 30.0, "factor": 0.003}
    return [
        *_runs("layers", "layers_vanish_sigmoid_deep_sgdm", TUNE1_HOLD1, kind="sigmoid", steps=800),
        *_runs("layers", "layers_vanish_tanh_small_init_sgdm", TUNE1_HOLD1, kind="tanh_small", steps=800),
        *_runs("layers", "layers_vanish_dead_relu_sgdm", TUNE2_HOLD1, kind="dead", steps=1000),
        *_runs("layers", "layers_vanish_frozen_ln_adam", TUNE1_HOLD1, kind="frozen", factor=300.0, steps=1000, **adam),
        *_runs(
            "layers",
            "layers_vanish_frozen_bn_cnn_sgdm",
            {0: "holdout"},
            kind="frozen",
            arch="cnn",
            factor=300.0,
            lr=0.02,
            steps=800,
        ),
        *_runs("layers", "layers_explode_maxnorm_ln_adam", TUNE1_HOLD1, steps=1000, **maxnorm, **adam),
        *_runs("layers", "layers_explode_maxnorm_ln_sgdm", TUNE1_HOLD1, steps=1000, **{**maxnorm, "factor": 0.001}),
        *_runs("layers", "layers_explode_maxnorm_bn_cnn_adam", TUNE1_HOLD1, arch="cnn", steps=800, **maxnorm, **adam),
        *_runs(
            "layers", "layers_explode_maxnorm_bn_cnn_sgdm", {0: "holdout"}, arch="cnn", lr=0.02, steps=800, **maxnorm
        ),
        *_runs("layers", "healthy_layers_relu_deep_sgdm", TUNE1_HOLD1, kind="relu", steps=1200),
        *_runs("layers", "healthy_layers_tanh_xavier_sgdm", TUNE1_HOLD1, kind="tanh", steps=1200),
        *_runs("layers", "healthy_layers_ln_mlp_adam", TUNE1_HOLD1, kind="ln", steps=1200, **adam),
        *_runs("layers", "healthy_layers_ln_mlp_sgdm", {0: "holdout"}, kind="ln", steps=1200),
        *_runs("layers", "healthy_layers_bn_cnn_sgdm", TUNE1_HOLD1, kind="bn_cnn", lr=0.02, steps=1000),
        *_runs("layers", "healthy_layers_cnn_adamw", {0: "tune"}, kind="cnn", steps=1000, **cosine),
        *_runs("layers", "healthy_layers_transformer_adamw", TUNE1_HOLD1, kind="transformer", steps=1000, **cosine),
    ]


def _ranks() -> list[Run]:
    """Ranks drifting apart: two-rank DDP runs (gloo, two processes each) where rank 1 has one
    weight moved by 1e-3 or by one ulp, skips one optimizer step, or takes a 1% higher
    learning rate, at a step between two checks; and healthy two-rank runs (SGD with
    momentum, Adam)."""
    adam = {"opt": "adam", "lr": 1e-3}
    return [
        *_runs("ranks", "ranks_nudge_sgdm", TUNE1_HOLD1, kind="nudge"),
        *_runs("ranks", "ranks_skip_step_adam", {0: "tune"}, kind="skip", at=217, **adam),
        *_runs("ranks", "ranks_one_ulp_sgdm", {0: "holdout"}, kind="ulp", at=260),
        *_runs("ranks", "ranks_lr_mismatch_adam", {0: "tune"}, kind="lr", at=99, **adam),
        *_runs("ranks", "healthy_ranks_sgdm", TUNE1_HOLD1),
        *_runs("ranks", "healthy_ranks_adam", TUNE1_HOLD1, **adam),
    ]


def _dead_slow() -> list[Run]:
    """Dead units: a hidden layer's bias lowered by 10 at step 400 (most of its ReLUs off), a
    learning rate x30 for 3 steps (units of every layer die), a conv layer's bias lowered by
    30 (every channel off); healthy deep ReLU MLPs (SGD+momentum, Adam) and a ReLU CNN. Slow
    steps: real tiny trainings whose step times come from a simulated clock (a loader stall
    every 4th step, a 0.1%-a-step throttle, a recompile every 10th step, all from step 500;
    healthy: +-10% jitter and a checkpoint pause every 300 steps)."""
    conv = {"kind": "conv_shift", "layer": 1, "shift": 30.0, "lr": 0.02, "steps": 600}
    return [
        *_runs("dead", "dead_bias_shift_sgdm_mlp", TUNE1_HOLD1, kind="bias_shift", shift=10.0),
        *_runs("dead", "dead_lr_bump_sgdm_mlp", {0: "tune", 2: "holdout"}, kind="lr_bump", factor=30.0),
        *_runs("dead", "dead_conv_shift_sgdm_cnn", TUNE1_HOLD1, **conv),
        *_runs("dead", "healthy_dead_relu_deep_sgdm", TUNE1_HOLD1, kind="relu"),
        *_runs("dead", "healthy_dead_relu_deep_adam", {0: "tune"}, kind="relu", opt="adam", lr=1e-3),
        *_runs("dead", "healthy_dead_relu_cnn_sgdm", TUNE1_HOLD1, kind="cnn", lr=0.02, steps=600),
        *_runs("perf", "slow_loader_stall", TUNE1_HOLD1, schedule="stall"),
        *_runs("perf", "slow_throttle", TUNE1_HOLD1, schedule="throttle"),
        *_runs("perf", "slow_recompile_loop", TUNE1_HOLD1, schedule="recompile"),
        *_runs("perf", "healthy_perf_jitter_checkpoints", TUNE1_HOLD1, schedule="jitter"),
        *_runs("perf", "healthy_perf_jitter_checkpoints_long", {2: "holdout"}, schedule="jitter", steps=3000),
    ]


RUNS: list[Run] = [
    # gradual divergence: warm-up to a learning rate far too high
    *_mb(
        "div_warmup_sgdm_mlp_b64", TUNE2_HOLD1, arch="mlp", opt="sgdm", batch=64, steps=1500, schedule=WARMUP_TOO_HIGH
    ),
    *_mb(
        "div_warmup_sgdm_mlp_b32", TUNE1_HOLD1, arch="mlp", opt="sgdm", batch=32, steps=2000, schedule=WARMUP_TOO_HIGH
    ),
    *_mb(
        "div_slow_warmup_sgdm_mlp_b64",
        TUNE1_HOLD1,
        arch="mlp",
        opt="sgdm",
        batch=64,
        steps=1500,
        schedule={"lr": 0.01, "warmup": 500, "peak": 1.0},
    ),
    *_mb(
        "div_warmup_sgd_mlp_b32",
        TUNE1_HOLD1,
        arch="mlp",
        opt="sgd",
        batch=32,
        steps=1500,
        schedule={"lr": 0.05, "warmup": 500, "peak": 8.0},
    ),
    *_mb("div_const_sgdm_mlp_b32", TUNE1_HOLD1, arch="mlp", opt="sgdm", batch=32, steps=2000, schedule={"lr": 1.5}),
    *_mb(
        "div_warmup_sgdm_cnn_b64",
        TUNE1_HOLD1,
        arch="cnn",
        opt="sgdm",
        batch=64,
        steps=1000,
        schedule={"lr": 0.01, "warmup": 400, "peak": 1.0},
    ),
    *_mb(
        "div_warmup_sgdm_transformer_b32",
        HOLD2,
        arch="transformer",
        opt="sgdm",
        batch=32,
        steps=1500,
        schedule={"lr": 0.01, "warmup": 600, "peak": 2.0},
    ),
    # sudden divergence: the learning rate jumps from 0.05 to 10
    *_mb(
        "div_jump_sgd_mlp_b32",
        TUNE1_HOLD1,
        "sudden",
        arch="mlp",
        opt="sgd",
        batch=32,
        steps=800,
        schedule={"lr": 0.05, "jump": [400, 10.0]},
    ),
    *_mb(
        "div_jump_sgdm_cnn_b32",
        HOLD2,
        "sudden",
        arch="cnn",
        opt="sgdm",
        batch=32,
        steps=800,
        schedule={"lr": 0.05, "jump": [400, 10.0]},
    ),
    # loss spikes: corrupted batches, a few-step LR bump, inputs scaled for a few steps
    *_mb("spike_corrupt_sgdm_mlp_b32", TUNE2_HOLD1, arch="mlp", steps=900, corrupt=(300, 500, 700)),
    *_mb(
        "spike_corrupt_adam_cnn_b32",
        TUNE1_HOLD1,
        arch="cnn",
        opt="adam",
        steps=900,
        schedule={"lr": 1e-3},
        corrupt=(300, 500, 700),
    ),
    *_mb(
        "spike_lrbump_sgdm_mlp_b32",
        TUNE2_HOLD1,
        arch="mlp",
        steps=900,
        schedule={"lr": 0.05, "bumps": [[300, 2, 50.0], [600, 2, 50.0]]},
    ),
    *_mb(
        "spike_scaled_sgdm_mlp_b8",
        TUNE2_HOLD1,
        arch="mlp",
        batch=8,
        steps=1200,
        schedule={"lr": 0.02},
        scale=[[400, 3, 10.0], [800, 4, 10.0]],
    ),
    *_mb(
        "spike_scaled_adamw_transformer_b16",
        HOLD2,
        arch="transformer",
        opt="adamw",
        batch=16,
        steps=800,
        schedule={"lr": 2e-3},
        scale=[[300, 3, 20.0], [600, 3, 20.0]],
    ),
    # Softmax Collapse
    Run("sc_modular_adam_s0", "sc_modular_adam", "modular", {"seed": 0}),
    Run("sc_modular_adam_s1", "sc_modular_adam", "modular", {"seed": 1}, "holdout"),
    *_mb(
        "sc_hover_sgdm_mlp_b64",
        TUNE1_HOLD1,
        arch="mlp",
        batch=64,
        steps=2500,
        schedule={"lr": 0.15},
        noise=0.5,
        flip=0.0,
        n=512,
    ),
    # full-batch GD at the edge of stability, and below it
    Run("eos_gd_lr0.2_s0", "eos_gd", "gd", {"lr": 0.2, "steps": 1200, "seed": 0}),
    Run("eos_gd_lr0.2_s1", "eos_gd", "gd", {"lr": 0.2, "steps": 1200, "seed": 1}, "holdout"),
    Run("eos_gd_lr0.15_s0", "eos_gd", "gd", {"lr": 0.15, "steps": 1500, "seed": 0}),
    Run("eos_gd_lr0.3_s2", "eos_gd", "gd", {"lr": 0.3, "steps": 1000, "seed": 2}, "holdout"),
    # class-incremental training with replay
    *[Run(f"continual_replay_s{s}", "continual_replay", "continual", {"seed": s}, p) for s, p in TUNE2_HOLD1.items()],
    # healthy runs of every kind
    Run("healthy_gd_below_edge_s0", "healthy_gd_below_edge", "gd", {"lr": 0.02, "steps": 1200, "seed": 0}),
    Run("healthy_gd_below_edge_s1", "healthy_gd_below_edge", "gd", {"lr": 0.02, "steps": 1200, "seed": 1}, "holdout"),
    Run("healthy_gd_lr0.05_s2", "healthy_gd_below_edge", "gd", {"lr": 0.05, "steps": 1200, "seed": 2}, "holdout"),
    *_mb("healthy_label_noise_sgdm_mlp_b32", TUNE1_HOLD1, arch="mlp", steps=1500, flip=0.3),
    *_mb("healthy_sgdm_mlp_b32", TUNE1_HOLD1, arch="mlp", steps=1500, schedule={"lr": 0.05}),
    *_mb("healthy_small_batch_sgdm_mlp_b4", TUNE2_HOLD1, arch="mlp", batch=4, steps=1500, schedule={"lr": 0.02}),
    *_mb(
        "healthy_warmup_cosine_adam_mlp_b8",
        TUNE1_HOLD1,
        arch="mlp",
        opt="adam",
        batch=8,
        steps=1500,
        schedule=HEALTHY_WARMUP_COSINE,
    ),
    *_mb(
        "healthy_warmup_cosine_adamw_cnn_b32",
        TUNE1_HOLD1,
        arch="cnn",
        opt="adamw",
        steps=1000,
        schedule=HEALTHY_WARMUP_COSINE,
    ),
    *_mb(
        "healthy_near_zero_adam_mlp_b32",
        TUNE1_HOLD1,
        arch="mlp",
        opt="adam",
        steps=1500,
        schedule={"lr": 1e-3},
        noise=0.5,
        flip=0.0,
    ),
    *_mb("healthy_sgd_cnn_b256", HOLD2, arch="cnn", opt="sgd", batch=256, steps=500, schedule={"lr": 0.1}),
    *_mb(
        "healthy_warmup_cosine_adamw_transformer_b32",
        TUNE1_HOLD1,
        arch="transformer",
        opt="adamw",
        steps=800,
        schedule=HEALTHY_WARMUP_COSINE,
    ),
    # issue 17: plateau, oscillation, overfitting
    *_issue17(),
    # issue 17: per-layer gradients
    *_layers(),
    # issue 17: ranks drifting apart
    *_ranks(),
    # issue 17: dead units and slow steps
    *_dead_slow(),
]


def generate(run: Run) -> list:
    """The run's points: [(series, step, value), ...] in the order the hook emits them."""
    import _corpus_runs as R
    import _detector_scenarios as S

    if run.gen == "minibatch":
        return R.minibatch(**run.params)
    if run.gen == "continual":
        return R.continual(**run.params)
    if run.gen == "gd":
        return S._gd(**run.params)[0]
    if run.gen == "modular":
        return S.softmax_collapse_modular(**run.params).points
    if run.gen == "layers":
        import _corpus_runs_layers as L

        return L.layers(**run.params)
    if run.gen == "ranks":
        import _corpus_runs_ranks as K

        return K.ranks(**run.params)
    if run.gen in ("dead", "perf"):
        import _corpus_runs_dead as D

        return getattr(D, run.gen)(**run.params)
    if run.gen in GEN_SOURCES:
        import _corpus_runs_plateau as P

        return getattr(P, run.gen)(**run.params)
    raise ValueError(run.gen)


def key(run: Run) -> str:
    h = hashlib.sha256()
    for f in SOURCES + GEN_SOURCES.get(run.gen, []):
        h.update(f.read_bytes())
    h.update(json.dumps([run.gen, run.params], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _path(run: Run) -> pathlib.Path:
    return CACHE / f"{run.name}-{key(run)}.json"


def _make(run: Run) -> tuple[str, float]:
    t = time.perf_counter()
    points = generate(run)
    names = sorted({p[0] for p in points})
    index = {n: i for i, n in enumerate(names)}
    CACHE.mkdir(exist_ok=True)
    tmp = _path(run).with_suffix(".tmp")
    tmp.write_text(json.dumps({"names": names, "points": [[index[n], s, v] for n, s, v in points]}))
    tmp.replace(_path(run))
    return run.name, time.perf_counter() - t


def load(run: Run) -> list:
    data = json.loads(_path(run).read_text())
    names = data["names"]
    return [(names[i], s, v) for i, s, v in data["points"]]


def ensure(runs: list[Run], regen: bool = False, processes: int = 2) -> dict:
    """Generate the runs missing from the cache (all of them with ``regen``), in ``processes``
    worker processes; return {"generated": n, "seconds": wall time, "cpu_seconds": per run}."""
    todo = [r for r in runs if regen or not _path(r).exists()]
    t = time.perf_counter()
    per_run = {}
    if todo:
        import multiprocessing

        # the slowest first, so two workers finish together
        todo.sort(key=lambda r: -r.params.get("steps", 1000) * (3 if r.params.get("arch") != "mlp" else 1))
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            for name, secs in pool.imap_unordered(_make, todo):
                per_run[name] = round(secs, 1)
                print(f"generated {name} in {secs:.1f}s", file=sys.stderr)
    return {"generated": len(todo), "seconds": round(time.perf_counter() - t, 1), "per_run_seconds": per_run}
