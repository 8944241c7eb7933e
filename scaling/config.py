"""Typed study-phase configs: loaded from YAML, validated once here, trusted everywhere else.

A *phase* (``scaling/phases/*.yaml`` or a user's ``--phase-file``) declares the model, the data,
the optimizer, the training budget and the grid. A *run config* (:class:`RunConfig`) is one point
of that grid (batch size, LR, clip threshold, seed) with everything resolved, e.g. a token budget
turned into a step count. Every error is a :class:`ConfigError` whose one-line message names the
field and the offending value; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2, nothing created."""


def cache_dir() -> Path:
    """Where derived files are cached (``SCALING_CACHE_DIR``, default ``~/.cache/scaling``): encoded
    splits, loss baselines, the migrated empty MLflow store that new SQLite stores start from."""
    d = Path(os.environ.get("SCALING_CACHE_DIR") or Path.home() / ".cache" / "scaling")
    d.mkdir(parents=True, exist_ok=True)
    return d


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message as one line for a one-line report: its first line, or its type's name when
    it has no message (``OSError()``)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def error_line(e: BaseException, limit: int = 200) -> str:
    """"Type: first line of the message", or the type alone when there is no message."""
    return type(e).__name__ + (f": {first_line(e, limit)}" if str(e).strip() else "")


DATASETS = ("wikitext2", "wikitext103", "text", "random", "modular")
CHAR_DATASETS = ("wikitext2", "wikitext103", "text")  # character-level text, vocabulary 128
SCHEDULES = ("constant", "cosine")
# tokens_per_param: tokens per non-embedding parameter (n_params_nonembedding), the same for every model size
BUDGET_KINDS = ("steps", "tokens", "flops", "tokens_per_param")
# What a search and a sweep's best-LR minimise (train.objective); step_val_acc_99: the modular phases' grokking speed
OBJECTIVES = ("final_val_loss", "min_val_loss", "final_train_loss", "step_val_acc_99")
BATCH_SCHEDULE_KINDS = ("constant", "linear", "exponential", "step")
LR_RULES = ("none", "sqrt", "linear")  # how the LR follows the batch size in force: unchanged, ∝ √B, ∝ B
SPLITS = ("train", "valid", "test")
# `--compile-mode` of the batched engine → the ``compile`` argument of scaling.batched.train_group:
# "max-autotune-gemm" autotunes only the matmuls (Triton templates chosen at compile time and cached with
# the graph: nothing is benchmarked when a process starts); max-autotune without inductor's own CUDA graphs,
# since train_group records the whole step itself
COMPILE_MODES = {"default": True, "max-autotune-gemm": {"max_autotune_gemm": True},
                 "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "wikitext2"
    corpus: str = ""  # dataset "text": the corpus's name, also the folder of --data-dir that holds it
    random_train_tokens: int = 2_000_000
    random_val_tokens: int = 200_000
    modulus: int = 97  # dataset modular: the prime p of the arithmetic tasks
    train_fraction: float = 0.5  # dataset modular: the share of all examples that trains


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 128
    vocab_size: int = 128
    dropout: float = 0.0  # on embeddings, attention weights and both residual branches while training


@dataclass(frozen=True)
class ModelSize:
    """One rung of a model-size ladder (``grid.model_sizes``): the phase's model with these three changed."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int


@dataclass(frozen=True)
class BatchSchedule:
    """The batch size over a run (``grid.schedules``; modular phases). ``constant``: ``batch`` (default: the
    configuration's batch size); ``linear`` / ``exponential``: from ``start`` at step 0 to ``end`` at the last
    step, arithmetically / geometrically; ``step``: ``steps`` lists (first step, batch size), the first at 0."""

    kind: str = "constant"
    batch: int | None = None
    start: int | None = None
    end: int | None = None
    steps: tuple[tuple[int, int], ...] = ()
    name: str = ""

    @property
    def label(self) -> str:
        """Its name, or one made from its shape (``linear_32_512``, ``constant_32``, ``constant``)."""
        if self.name:
            return self.name
        if self.kind == "constant":
            return "constant" if self.batch is None else f"constant_{self.batch}"
        if self.kind == "step":
            return f"step_{self.steps[0][1]}_{self.steps[-1][1]}" if self.steps else "step"
        return f"{self.kind}_{self.start}_{self.end}"

    def spec(self) -> str:
        """Everything that shapes the schedule, as one string (a run's ``batch_schedule`` param)."""
        if self.kind == "constant":
            return "constant" if self.batch is None else f"constant:{self.batch}"
        if self.kind == "step":
            return "step:" + ",".join(f"{s}:{b}" for s, b in self.steps)
        return f"{self.kind}:{self.start}->{self.end}"

    def batches(self) -> list[int]:
        """The batch sizes it names (None for a constant one without its own)."""
        return {"constant": [self.batch] if self.batch else [], "step": [b for _, b in self.steps]}.get(
            self.kind, [self.start, self.end])


@dataclass(frozen=True)
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup: float = 200  # in the unit of the budget (steps, tokens or FLOPs)
    schedule: str = "constant"
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak LR


@dataclass(frozen=True)
class TrainConfig:
    budget_kind: str = "steps"
    budget: float = 10_000
    eval_interval: int = 500
    eval_batches: int = 20
    log_interval: int = 50
    checkpoint_every: int = 1000
    seeds: tuple[int, ...] = (0,)
    grad_accum: int = 1  # micro-batches per step: the batch size is the effective batch, micro-batch x grad_accum
    label_smoothing: float = 0.0  # of the training loss only (validation losses are never smoothed)
    objective: str = "final_val_loss"  # what a search and a sweep's best LR minimise (OBJECTIVES)
    # Gradient-noise measurement (scaling.noise): at logging steps at least noise_interval steps apart
    # (0: none), on the step's batch split into micro-batches of noise_microbatch sequences; tail_index
    # adds the noise's tail index. Measuring leaves training unchanged, so none of it is in config_hash.
    noise_interval: int = 0
    noise_microbatch: int = 1
    tail_index: bool = False


@dataclass(frozen=True)
class GridConfig:
    batch_sizes: tuple[int, ...] = ()
    lrs: tuple[float, ...] = ()
    lr_by_batch_size: tuple[tuple[int, float], ...] = ()  # paired LR per batch size (phase 3b)
    clips: tuple[float | None, ...] = (1.0,)  # None = no clipping
    # Variant axes, each crossed with the grid above; an empty one is not an axis.
    model_sizes: tuple[ModelSize, ...] = ()  # a model-size ladder: each size its own configurations
    tasks: tuple[str, ...] = ()  # modular phases: scaling.modular.TASKS
    schedules: tuple[BatchSchedule, ...] = ()  # modular phases: batch-size schedules (default: constant)
    lr_rules: tuple[str, ...] = ()  # modular phases: LR_RULES (default: none)


@dataclass(frozen=True)
class Phase:
    name: str
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def variant_grid_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """For a sweep's parent run: ``params`` (one configuration's) without what its variant axes vary,
        plus those axes as lists (``grid_model_sizes``, ``grid_tasks``, ...)."""
        g, out = self.grid, dict(params)
        axes = {"model_sizes": ([s.name for s in g.model_sizes], ("model_size", "d_model", "n_layers", "n_heads")),
                "tasks": (list(g.tasks), ("task",)),
                "schedules": ([s.spec() for s in g.schedules], ("batch_schedule", "batch_schedule_name")),
                "lr_rules": (list(g.lr_rules), ("lr_rule",))}
        for axis, (values, keys) in axes.items():
            if values:
                for k in keys:
                    out.pop(k, None)
                out[f"grid_{axis}"] = ",".join(values)[:490]
        return out

    def grid_points(self) -> list[tuple[int, float, float | None, int]]:
        """Every (batch_size, lr, clip, seed) of the phase's grid, in a stable order."""
        points = []
        lr_map = dict(self.grid.lr_by_batch_size)
        for b in self.grid.batch_sizes:
            lrs = (lr_map[b],) if lr_map else self.grid.lrs
            for lr, clip, seed in itertools.product(lrs, self.grid.clips, self.train.seeds):
                points.append((b, lr, clip, seed))
        return points

    def variants(self) -> list[dict[str, str | None]]:
        """Every combination of the variant axes (model size, task, schedule, LR rule) by name, in a stable
        order; ``[{}]`` for a phase without them. The keywords of :meth:`run_config`."""
        g = self.grid
        axes = {"model_size": [s.name for s in g.model_sizes], "task": list(g.tasks),
                "schedule": [s.label for s in g.schedules], "lr_rule": list(g.lr_rules)}
        axes = {k: v for k, v in axes.items() if v}
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def run_configs(self, splits: tuple[str, str] = ("train", "valid")) -> list["RunConfig"]:
        """Every configuration of the phase (variants x grid points), resolved, each once: an LR rule has
        no effect on a schedule that never leaves the configuration's batch size, so those are one."""
        out, seen = [], set()
        for v in self.variants():
            for b, lr, clip, seed in self.grid_points():
                cfg = self.run_config(b, lr, clip, seed, splits=splits, **v)
                if cfg.config_hash() not in seen:
                    seen.add(cfg.config_hash())
                    out.append(cfg)
        return out

    def run_config(self, batch_size: int, lr: float, clip: float | None | str = "phase",
                   seed: int | None = None, splits: tuple[str, str] = ("train", "valid"), *,
                   model_size: str | None = None, task: str | None = None, schedule: str | None = None,
                   lr_rule: str | None = None) -> "RunConfig":
        """Resolve one configuration; ``clip="phase"`` takes the phase's (first) clip threshold. A variant
        axis (model size, task, schedule, LR rule) with one value needs no choice; with several, the
        configuration names one."""
        if clip == "phase":
            clip = self.grid.clips[0] if self.grid.clips else None
        seed = self.train.seeds[0] if seed is None else seed
        _check_run_values(batch_size, lr, clip, seed)
        _check_splits(self, splits)
        g = self.grid
        size = _pick(self, "model size", "--model-sizes", {s.name: s for s in g.model_sizes}, model_size)
        task = _pick(self, "task", "--tasks", {t: t for t in g.tasks}, task)
        sched = _pick(self, "batch-size schedule", "--schedules", {s.label: s for s in g.schedules}, schedule)
        rule = _pick(self, "LR rule", "--lr-rules", {r: r for r in g.lr_rules}, lr_rule)
        phase = self if size is None else dataclasses.replace(self, model=dataclasses.replace(
            self.model, d_model=size.d_model, n_layers=size.n_layers, n_heads=size.n_heads))
        if self.data.dataset == "modular":
            sched = sched or BatchSchedule()
            _check_modular_batches(self, task, [batch_size, *sched.batches()])
            if sched.kind == "constant" and sched.batch in (None, batch_size):
                rule = None  # the batch never changes: the rule has nothing to follow
        if batch_size % self.train.grad_accum:
            raise ConfigError(f"batch_size {batch_size} must be divisible by train.grad_accum "
                              f"({self.train.grad_accum})")
        steps, warmup_steps = _budget_to_steps(phase, batch_size)
        return RunConfig(phase=phase, batch_size=int(batch_size), lr=float(lr),
                         clip=None if clip is None else float(clip), seed=int(seed),
                         steps=steps, warmup_steps=warmup_steps,
                         train_split=splits[0], val_split=splits[1], task=task, schedule=sched,
                         lr_rule=rule or "none", model_size=None if size is None else size.name)

    def with_overrides(self, *, steps: int | None = None, tokens: float | None = None,
                       warmup: float | None = None, eval_interval: int | None = None,
                       eval_batches: int | None = None, log_interval: int | None = None,
                       checkpoint_every: int | None = None, batch_sizes=None, lrs=None,
                       clips=None, seeds=None, model_sizes=None, tasks=None, schedules=None,
                       lr_rules=None) -> "Phase":
        """A copy with command-line overrides applied and validated (``--steps`` etc.); ``model_sizes``,
        ``tasks``, ``schedules`` and ``lr_rules`` keep only the named entries of those axes."""
        train, optim = self.train, self.optim
        grid = _narrowed(self, model_sizes=model_sizes, tasks=tasks, schedules=schedules, lr_rules=lr_rules)
        if steps is not None and tokens is not None:
            raise ConfigError("give --steps or --tokens, not both")
        # The warmup is declared in the budget's unit: when an override changes the unit it is
        # dropped (0) unless --warmup gives it in the new unit.
        if steps is not None:
            positive_int("steps", steps)
            if train.budget_kind != "steps" and warmup is None:
                warmup = 0
            train = dataclasses.replace(train, budget_kind="steps", budget=steps)
        if tokens is not None:
            _positive("tokens", tokens)
            if train.budget_kind != "tokens" and warmup is None:
                warmup = 0
            train = dataclasses.replace(train, budget_kind="tokens", budget=tokens)
        if warmup is not None:
            optim = dataclasses.replace(optim, warmup=warmup)
        for name, value in (("eval_interval", eval_interval), ("eval_batches", eval_batches),
                            ("log_interval", log_interval), ("checkpoint_every", checkpoint_every)):
            if value is not None:
                train = dataclasses.replace(train, **{name: value})
        if seeds is not None:
            train = dataclasses.replace(train, seeds=tuple(seeds))
        if batch_sizes is not None:
            grid = dataclasses.replace(grid, batch_sizes=tuple(batch_sizes))
            if grid.lr_by_batch_size:
                missing = [b for b in grid.batch_sizes if b not in dict(grid.lr_by_batch_size)]
                if missing and lrs is None:
                    raise ConfigError(f"batch_size {missing[0]} has no paired LR in phase {self.name!r}")
        if lrs is not None:
            grid = dataclasses.replace(grid, lrs=tuple(lrs), lr_by_batch_size=())
        if clips is not None:
            grid = dataclasses.replace(grid, clips=tuple(clips))
        phase = dataclasses.replace(self, train=train, optim=optim, grid=grid)
        return _validated(_to_plain(phase))


@dataclass(frozen=True)
class RunConfig:
    """One fully resolved training configuration (a point of a phase's grid)."""

    phase: Phase
    batch_size: int
    lr: float
    clip: float | None
    seed: int
    steps: int
    warmup_steps: int
    train_split: str = "train"
    val_split: str = "valid"
    task: str | None = None  # modular phases: scaling.modular.TASKS
    schedule: BatchSchedule | None = None  # modular phases: the batch size over the run (batch_size: its reference)
    lr_rule: str = "none"  # modular phases: lr holds at batch_size; LR_RULES says how it follows the batch in force
    model_size: str | None = None  # the ladder rung's name (phase.model is already that size)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.phase.model.context_length

    @property
    def batchable(self) -> bool:
        """Whether the batched engine (scaling.batched) can train it: a language model without dropout,
        label smoothing or gradient accumulation. Others train one at a time (scaling.runner.run_group)."""
        t = self.phase.train
        return self.task is None and self.phase.model.dropout == 0 and t.label_smoothing == 0 and t.grad_accum == 1

    def corpus_key(self):
        """Configurations with equal keys train on the same corpus: random tokens depend on the seed, a
        modular split on the task and the seed."""
        dataset = self.phase.data.dataset
        return (self.task, self.seed) if dataset == "modular" else self.seed if dataset == "random" else None

    def variant_params(self) -> dict[str, Any]:
        """The params of the variant axes the configuration has (none for the classic phases)."""
        d, out = self.phase.data, {}
        if self.model_size is not None:
            out["model_size"] = self.model_size
        if d.dataset == "modular":
            out.update(task=self.task, modulus=d.modulus, train_fraction=d.train_fraction,
                       batch_schedule=self.schedule.spec(), batch_schedule_name=self.schedule.label,
                       lr_rule=self.lr_rule)
        return out

    def variant_text(self) -> str:
        """`` size=m`` / `` task=x_plus_y schedule=linear_32_512 lr_rule=sqrt``, or "" (labels, run names)."""
        v = self.variant_params()
        keys = [("size", "model_size"), ("task", "task"), ("schedule", "batch_schedule_name"), ("lr_rule", "lr_rule")]
        return "".join(f" {short}={v[k]}" for short, k in keys if k in v)

    def run_name(self) -> str:
        name = f"B{self.batch_size}-lr{self.lr:g}-clip{clip_text(self.clip)}-s{self.seed}"
        return name + "".join("-" + part.split("=")[1] for part in self.variant_text().split())

    @property
    def measures_noise(self) -> bool:
        """Whether this run measures gradient noise: the phase asks for it and its batch splits into at least
        two micro-batches of ``noise_microbatch`` (every batch size of the grid does; one outside it may not)."""
        t = self.phase.train
        return t.noise_interval > 0 and self.batch_size % t.noise_microbatch == 0 \
            and self.batch_size // t.noise_microbatch >= 2

    def to_params(self) -> dict[str, Any]:
        """Flat, stable parameter names: the same for every run of every phase (MLflow params)."""
        p, m, o, t = self.phase, self.phase.model, self.phase.optim, self.phase.train
        return {
            "phase": p.name,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "grad_clip": "none" if self.clip is None else self.clip,
            "seed": self.seed,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "budget_kind": t.budget_kind,
            "budget": t.budget,
            "schedule": o.schedule,
            "min_lr_ratio": o.min_lr_ratio,
            "optimizer": "adamw",
            "beta1": o.betas[0],
            "beta2": o.betas[1],
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "context_length": m.context_length,
            "vocab_size": m.vocab_size,
            "dataset": p.data.dataset,
            **({"corpus": p.data.corpus} if p.data.corpus else {}),
            "train_split": self.train_split,
            "val_split": self.val_split,
            "eval_interval": t.eval_interval,
            "eval_batches": t.eval_batches,
            "log_interval": t.log_interval,
            "checkpoint_every": t.checkpoint_every,
            "tokens_per_step": self.tokens_per_step,
            "dropout": m.dropout,
            "label_smoothing": t.label_smoothing,
            "grad_accum": t.grad_accum,
            **self.variant_params(),
        }

    def config_hash(self) -> str:
        """Stable hash of everything that determines the result (used to skip finished configs)."""
        params = self.to_params()
        for k in ("eval_interval", "eval_batches", "log_interval", "checkpoint_every"):
            params.pop(k)  # how often we look does not change what is trained... except eval:
        params["eval_batches"] = self.phase.train.eval_batches  # ...the val set does
        for k, off in (("dropout", 0.0), ("label_smoothing", 0.0), ("grad_accum", 1)):
            if params[k] == off:  # off: the hash of every configuration that predates the option
                params.pop(k)
        if self.phase.data.dataset == "random":
            params["random_train_tokens"] = self.phase.data.random_train_tokens
            params["random_val_tokens"] = self.phase.data.random_val_tokens
        blob = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warmup_note(cfgs) -> str | None:
    """One line naming the batch sizes whose runs end before their warmup does (their LR never reaches its
    peak: the last step's LR is steps/warmup_steps of it), or None when every run completes its warmup."""
    short = sorted({(c.batch_size, c.steps, c.warmup_steps) for c in cfgs if c.warmup_steps > c.steps})
    if not short:
        return None
    parts = ", ".join(f"B={b}: {s} steps, warmup {w} (LR reaches {s / w:.0%} of its peak)" for b, s, w in short)
    return f"note: these runs are shorter than their warmup, so their LR never reaches its peak: {parts}"


def say_warmup(cfgs) -> None:
    """Print :func:`warmup_note` on stderr, if there is one (once per command, after its input was checked)."""
    note = warmup_note(cfgs)
    if note:
        print(note, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Loading


class _PhaseLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus the exponent forms it leaves as strings (``1e-4``, ``3E5``, ``1.0e4``:
    its resolver wants a dot and a signed exponent), which no researcher means as text."""


_PhaseLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text → Python objects, reading ``1e-4`` as a number (:class:`_PhaseLoader`)."""
    return yaml.load(text, Loader=_PhaseLoader)  # noqa: S506 - a SafeLoader subclass


def builtin_phase_names() -> list[str]:
    files = resources.files("scaling.phases").iterdir()
    return sorted(Path(str(f)).stem for f in files if str(f).endswith(".yaml"))


def load_phase(name: str | None = None, phase_file: str | Path | None = None) -> Phase:
    """Load a built-in phase by name, or a user's YAML file; validate it fully."""
    if phase_file is not None:
        path = Path(phase_file)
        if not path.is_file():
            raise ConfigError(f"phase file not found: {str(path)!r}")
        text = path.read_text()
        source = str(path)
    else:
        names = builtin_phase_names()
        if name not in names:
            raise ConfigError(f"unknown phase {name!r}; built-in phases: {', '.join(names)}")
        text = resources.files("scaling.phases").joinpath(f"{name}.yaml").read_text()
        source = f"built-in phase {name}"
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({first_line(e, 10_000)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of phase fields, got {type(raw).__name__}")
    if phase_file is None:
        raw.setdefault("name", name)
    elif "name" not in raw:
        raw["name"] = Path(phase_file).stem
    return _validated(raw)


def _validated(raw: dict) -> Phase:
    sections = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                "train": TrainConfig, "grid": GridConfig}
    _no_unknown_keys("", raw, {"name", "description", *sections})
    kwargs: dict[str, Any] = {"name": str(raw["name"]), "description": str(raw.get("description") or "")}
    for key, cls in sections.items():
        sub = raw.get(key) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"{key} must be a mapping, got {sub!r}")
        _no_unknown_keys(key + ".", sub, {f.name for f in dataclasses.fields(cls)})
        kwargs[key] = cls(**{k: _coerce(f"{key}.{k}", cls, k, v) for k, v in sub.items()})
    if kwargs["train"].budget_kind == "steps":  # a step budget written 1e4 is the integer it names
        kwargs["train"] = dataclasses.replace(kwargs["train"], budget=whole(kwargs["train"].budget))
    phase = Phase(**kwargs)
    _check_phase(phase)
    return phase


def _to_plain(phase: Phase) -> dict:
    d = dataclasses.asdict(phase)
    d["grid"]["lr_by_batch_size"] = {b: lr for b, lr in phase.grid.lr_by_batch_size}
    return d


def _no_unknown_keys(prefix: str, d: dict, allowed: set[str]) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"unknown key {prefix}{k!r}; allowed: {', '.join(sorted(allowed))}")


INT_LISTS = ("seeds", "batch_sizes")


def whole(x):
    """A float with no fractional part (``1e4`` in YAML, ``2.0``) as the int it names; anything else as is."""
    return int(x) if isinstance(x, float) and math.isfinite(x) and x.is_integer() else x


def _coerce(path: str, cls, key: str, value):
    """Turn YAML values into the dataclass field types (lists → tuples, whole floats of integer fields →
    ints), rejecting wrong types."""
    if key in ("model_sizes", "schedules"):
        return _coerce_entries(path, {"model_sizes": ModelSize, "schedules": BatchSchedule}[key], value)
    if key in ("betas", "seeds", "batch_sizes", "lrs", "clips", "tasks", "lr_rules"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(whole(v) for v in value) if key in INT_LISTS else tuple(value)
    if {f.name: f.type for f in dataclasses.fields(cls)}.get(key) == "int":
        return whole(value)
    if key == "lr_by_batch_size":
        if isinstance(value, dict):
            return tuple(sorted(value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(tuple(x) for x in value)
        raise ConfigError(f"{path} must be a mapping batch_size: lr, got {value!r}")
    return value


def _coerce_entries(path: str, cls, value) -> tuple:
    """A list of mappings → a tuple of ``cls`` (ModelSize, BatchSchedule)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} must be a list of mappings, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, cls):
            out.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}[{i}] must be a mapping, got {entry!r}")
        _no_unknown_keys(f"{path}[{i}].", entry, fields)
        if cls is ModelSize and set(entry) != fields:
            raise ConfigError(f"{path}[{i}] must give {', '.join(sorted(fields))}, got {entry!r}")
        entry = dict(entry)
        if "steps" in entry:
            steps = entry["steps"]
            if not isinstance(steps, (list, tuple)) or not all(isinstance(x, (list, tuple)) and len(x) == 2
                                                                for x in steps):
                raise ConfigError(f"{path}[{i}].steps must be a list of [step, batch size] pairs, got {steps!r}")
            entry["steps"] = tuple(tuple(x) for x in steps)
        if cls is BatchSchedule and entry.get("name") is None:
            entry["name"] = ""
        out.append(cls(**entry))
    return tuple(out)


def _pick(phase: "Phase", axis: str, option: str, named: dict, given: str | None):
    """The entry of a variant axis a configuration uses: ``given`` by name, or the only one (None: no axis)."""
    if not named:
        if given is not None:
            raise ConfigError(f"phase {phase.name!r} has no {axis} axis, got {given!r}")
        return None
    if given is None:
        if len(named) > 1:
            raise ConfigError(f"phase {phase.name!r} has {len(named)} {axis}s ({', '.join(named)}): "
                              f"choose one with {option}")
        return next(iter(named.values()))
    if given not in named:
        raise ConfigError(f"{axis} {given!r} is not in phase {phase.name!r} ({', '.join(named)})")
    return named[given]


def _narrowed(phase: "Phase", **keep) -> GridConfig:
    """The phase's grid with only the named entries of the variant axes given (``--model-sizes m,l``)."""
    g = phase.grid
    label = {"model_sizes": lambda s: s.name, "schedules": lambda s: s.label}
    changes = {}
    for axis, names in keep.items():
        if names is None:
            continue
        entries = getattr(g, axis)
        have = [label.get(axis, str)(e) for e in entries]
        for n in names:
            if n not in have:
                raise ConfigError(f"{axis} entry {n!r} is not in phase {phase.name!r} "
                                  f"({', '.join(have) or 'it has none'})")
        changes[axis] = tuple(e for e, h in zip(entries, have) if h in names)
    return dataclasses.replace(g, **changes)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive_int(name: str, x) -> None:
    """ConfigError unless ``x`` is an int (not a bool) >= 1."""
    if not (isinstance(x, int) and not isinstance(x, bool)) or x < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {x!r}")


def clip_text(clip: float | None) -> str:
    """A clip threshold as run names, labels and parameters spell it: "none" or the number (``%g``)."""
    return "none" if clip is None else f"{clip:g}"


def compile_text(compile) -> str:
    """train_group's ``compile`` argument as the ``scaling.compile`` tag spells it: off, a COMPILE_MODES
    name, or the argument itself."""
    if compile is False:
        return "off"
    names = [k for k, v in COMPILE_MODES.items() if type(v) is type(compile) and v == compile]
    return names[0] if names else str(compile)


def _positive(name: str, x) -> None:
    if not _is_number(x) or x <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {x!r}")


def _check_run_values(batch_size, lr, clip, seed) -> None:
    positive_int("batch_size", batch_size)
    _positive("lr", lr)
    if clip is not None:
        _positive("grad_clip", clip)
    if not (isinstance(seed, int) and not isinstance(seed, bool)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")


def _check_splits(phase: Phase, splits) -> None:
    train, val = splits
    for name, s in (("train split", train), ("validation split", val)):
        if s not in SPLITS:
            raise ConfigError(f"{name} must be one of {', '.join(SPLITS)}, got {s!r}")
    if phase.data.dataset != "random" and train == val:
        raise ConfigError(f"train and validation splits must differ, got {train!r} for both")


def _check_phase(p: Phase) -> None:
    d, m, o, t, g = p.data, p.model, p.optim, p.train, p.grid
    if not p.name or any(c in p.name for c in "/\\ "):
        raise ConfigError(f"name must be a non-empty word, got {p.name!r}")
    if d.dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {d.dataset!r}")
    positive_int("data.random_train_tokens", d.random_train_tokens)
    positive_int("data.random_val_tokens", d.random_val_tokens)
    for k in ("d_model", "n_layers", "n_heads", "context_length", "vocab_size"):
        positive_int(f"model.{k}", getattr(m, k))
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if d.dataset in CHAR_DATASETS and m.vocab_size < 128:
        raise ConfigError(f"model.vocab_size must be >= 128 for character-level {d.dataset}, got {m.vocab_size}")
    if (d.dataset == "text") != bool(d.corpus) or not re.fullmatch(r"[\w.-]*", str(d.corpus)):
        raise ConfigError(f"data.corpus names the text corpus (a folder name) exactly when data.dataset is text; "
                          f"got dataset {d.dataset!r}, corpus {d.corpus!r}")
    if d.dataset == "random" and d.random_train_tokens <= m.context_length:
        raise ConfigError(f"data.random_train_tokens must exceed model.context_length, got {d.random_train_tokens}")
    if len(o.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)!r}")
    _positive("optim.eps", o.eps)
    if not _is_number(o.weight_decay) or o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be a number >= 0, got {o.weight_decay!r}")
    if not _is_number(o.warmup) or o.warmup < 0:
        raise ConfigError(f"optim.warmup must be a number >= 0, got {o.warmup!r}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if not _is_number(o.min_lr_ratio) or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio!r}")
    if t.budget_kind not in BUDGET_KINDS:
        raise ConfigError(f"train.budget_kind must be one of {', '.join(BUDGET_KINDS)}, got {t.budget_kind!r}")
    if t.budget_kind == "steps":
        positive_int("train.budget (steps)", t.budget)
    else:
        _positive(f"train.budget ({t.budget_kind})", t.budget)
    for k in ("eval_interval", "eval_batches", "log_interval", "checkpoint_every"):
        positive_int(f"train.{k}", getattr(t, k))
    if not t.seeds:
        raise ConfigError("train.seeds must list at least one seed")
    for s in t.seeds:
        if not (isinstance(s, int) and not isinstance(s, bool)) or s < 0:
            raise ConfigError(f"train.seeds entries must be integers >= 0, got {s!r}")
    if not g.batch_sizes:
        raise ConfigError("grid.batch_sizes must list at least one batch size")
    for b in g.batch_sizes:
        positive_int("batch_size", b)
    if g.lrs and g.lr_by_batch_size:
        raise ConfigError("grid: give lrs or lr_by_batch_size, not both")
    if not g.lrs and not g.lr_by_batch_size:
        raise ConfigError("grid.lrs must list at least one learning rate")
    for lr in g.lrs:
        _positive("lr", lr)
    lr_map = dict(g.lr_by_batch_size)
    for b, lr in g.lr_by_batch_size:
        positive_int("batch_size", b)
        _positive("lr", lr)
    for b in g.batch_sizes if lr_map else ():
        if b not in lr_map:
            raise ConfigError(f"grid.lr_by_batch_size has no LR for batch_size {b}")
    if not g.clips:
        raise ConfigError("grid.clips must list at least one threshold (null = no clipping)")
    for c in g.clips:
        if c is not None:
            _positive("grad_clip", c)
    _check_training_options(p)
    _check_variants(p)
    _check_noise(t)
    for b in g.batch_sizes:
        _check_noise(t, b)
    if t.noise_interval and m.dropout:  # the measurement must leave the run's random stream alone
        raise ConfigError("train.noise_interval needs model.dropout 0 (measuring with dropout would draw random "
                          "numbers); set train.noise_interval: 0 to train with dropout")
    for b in g.batch_sizes:  # every grid point must resolve to >= 1 step, at every model size
        for size in g.model_sizes or (None,):
            _budget_to_steps(p if size is None else dataclasses.replace(p, model=dataclasses.replace(
                p.model, d_model=size.d_model, n_layers=size.n_layers, n_heads=size.n_heads)), b)


def _check_training_options(p: Phase) -> None:
    m, t = p.model, p.train
    if not _is_number(m.dropout) or not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout!r}")
    if not _is_number(t.label_smoothing) or not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing!r}")
    positive_int("train.grad_accum", t.grad_accum)
    for b in p.grid.batch_sizes:
        if b % t.grad_accum:
            raise ConfigError(f"batch_size {b} must be divisible by train.grad_accum ({t.grad_accum})")
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {t.objective!r}")
    if t.objective == "step_val_acc_99" and p.data.dataset != "modular":
        raise ConfigError("train.objective step_val_acc_99 needs data.dataset modular")


def _check_variants(p: Phase) -> None:
    g = p.grid
    names = [s.name for s in g.model_sizes]
    for s in g.model_sizes:
        if not isinstance(s.name, str) or not s.name or any(c in s.name for c in "/\\ ,="):
            raise ConfigError(f"grid.model_sizes names must be words, got {s.name!r}")
        for k in ("d_model", "n_layers", "n_heads"):
            positive_int(f"grid.model_sizes {s.name}: {k}", getattr(s, k))
        if s.d_model % s.n_heads:
            raise ConfigError(f"grid.model_sizes {s.name}: d_model ({s.d_model}) must be divisible by "
                              f"n_heads ({s.n_heads})")
    if len(set(names)) != len(names):
        raise ConfigError(f"grid.model_sizes names must differ, got {names}")
    if p.data.dataset == "modular":
        _check_modular(p)
    elif g.tasks or g.schedules or g.lr_rules:
        raise ConfigError("grid.tasks, grid.schedules and grid.lr_rules need data.dataset modular")


def _check_modular(p: Phase) -> None:
    from scaling import modular

    d, m, g = p.data, p.model, p.grid
    if not (isinstance(d.modulus, int) and not isinstance(d.modulus, bool)) or not modular.is_prime(d.modulus):
        raise ConfigError(f"data.modulus must be a prime (x_div_y needs inverses), got {d.modulus!r}")
    if not _is_number(d.train_fraction) or not 0 < d.train_fraction < 1:
        raise ConfigError(f"data.train_fraction must be in (0, 1), got {d.train_fraction!r}")
    if m.vocab_size != modular.vocab_size(d.modulus) or m.context_length != modular.CONTEXT:
        raise ConfigError(f"model.vocab_size must be {modular.vocab_size(d.modulus)} and model.context_length "
                          f"{modular.CONTEXT} for data.dataset modular with modulus {d.modulus} (tokens [x, op, y, =]; "
                          f"got {m.vocab_size} and {m.context_length})")
    if not g.tasks:
        raise ConfigError(f"grid.tasks must list at least one of {', '.join(modular.TASKS)}")
    for task in g.tasks:
        if task not in modular.TASKS:
            raise ConfigError(f"grid.tasks entries must be among {', '.join(modular.TASKS)}, got {task!r}")
    for rule in g.lr_rules:
        if rule not in LR_RULES:
            raise ConfigError(f"grid.lr_rules entries must be among {', '.join(LR_RULES)}, got {rule!r}")
    for axis, values in (("tasks", g.tasks), ("lr_rules", g.lr_rules), ("schedules", [s.label for s in g.schedules])):
        if len(set(values)) != len(values):
            raise ConfigError(f"grid.{axis} entries must differ, got {list(values)}")
    if p.train.budget_kind != "steps":
        raise ConfigError(f"train.budget_kind must be steps for data.dataset modular, got {p.train.budget_kind!r}")
    if p.train.grad_accum != 1:
        raise ConfigError("train.grad_accum must be 1 for data.dataset modular")
    for s in g.schedules:
        _check_schedule(s)
    for task in g.tasks:
        for s in g.schedules or (BatchSchedule(),):
            for b in g.batch_sizes:
                _check_modular_batches(p, task, [b, *s.batches()])


def _check_schedule(s: BatchSchedule) -> None:
    where = f"grid.schedules {s.label}"
    if s.kind not in BATCH_SCHEDULE_KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(BATCH_SCHEDULE_KINDS)}, got {s.kind!r}")
    if not isinstance(s.name, str) or any(c in s.name for c in "/\\ ,="):
        raise ConfigError(f"{where}: name must be a word, got {s.name!r}")
    given = {k for k in ("batch", "start", "end") if getattr(s, k) is not None} | ({"steps"} if s.steps else set())
    allowed = {"constant": {"batch"}, "step": {"steps"}}.get(s.kind, {"start", "end"})
    if given - allowed:
        raise ConfigError(f"{where}: a {s.kind} schedule takes {', '.join(sorted(allowed))}, "
                          f"not {', '.join(sorted(given - allowed))}")
    if s.kind in ("linear", "exponential") and given != allowed:
        raise ConfigError(f"{where}: a {s.kind} schedule needs start and end")
    if s.kind == "step":
        if not s.steps or s.steps[0][0] != 0:
            raise ConfigError(f"{where}: steps must list [step, batch size] pairs, the first at step 0")
        for a, b in zip(s.steps, s.steps[1:]):
            if not (isinstance(b[0], int) and b[0] > a[0]):
                raise ConfigError(f"{where}: the steps must increase, got {[x[0] for x in s.steps]}")
    for b in s.batches():
        positive_int(f"{where}: batch size", b)


def _check_modular_batches(p: Phase, task: str, batches) -> None:
    """Every batch a modular configuration draws fits in its training set (an example at most once a batch)."""
    from scaling import modular

    n = modular.train_size(task, p.data.modulus, p.data.train_fraction)
    if max(batches) > n:
        raise ConfigError(f"batch size {max(batches)} exceeds the {n} training examples of {task} "
                          f"(modulus {p.data.modulus}, train fraction {p.data.train_fraction:g})")


def _check_noise(t: TrainConfig, batch_size: int | None = None) -> None:
    """The noise options alone, or whether they can measure the grid's ``batch_size``: its micro-batches
    must split it evenly, at least two of them (the noise scale compares micro-batches)."""
    if batch_size is None:
        if not (isinstance(t.noise_interval, int) and not isinstance(t.noise_interval, bool)) or t.noise_interval < 0:
            raise ConfigError(f"train.noise_interval must be an integer >= 0 (0: no noise measurement), "
                              f"got {t.noise_interval!r}")
        positive_int("train.noise_microbatch", t.noise_microbatch)
        if not isinstance(t.tail_index, bool):
            raise ConfigError(f"train.tail_index must be true or false, got {t.tail_index!r}")
        if t.tail_index and not t.noise_interval:
            raise ConfigError("train.tail_index needs train.noise_interval > 0 (it is measured with the noise scale)")
        return
    b = t.noise_microbatch
    if t.noise_interval and (batch_size % b or batch_size // b < 2):
        raise ConfigError(f"train.noise_microbatch ({b}) must split batch_size {batch_size} into at least 2 "
                          f"equal micro-batches; set train.noise_interval: 0 to measure no gradient noise")


def n_params_estimate(m: ModelConfig) -> int:
    """Parameter count of :class:`scaling.model.NanoTransformer` (checked against the model in tests)."""
    per_layer = 12 * m.d_model * m.d_model + 4 * m.d_model  # qkv, proj, mlp; two LayerNorms
    return m.n_layers * per_layer + m.vocab_size * m.d_model + m.context_length * m.d_model + 2 * m.d_model


def n_params_nonembedding(m: ModelConfig) -> int:
    """Kaplan et al. (2020)'s N: 12 n_layers d_model², the weights of attention and MLP (no embeddings, no
    LayerNorms) — the N of the ladder's budget (train.budget_kind tokens_per_param) and of its L(N) fit."""
    return 12 * m.n_layers * m.d_model * m.d_model


def _budget_to_steps(p: Phase, batch_size: int) -> tuple[int, int]:
    """Turn the phase's budget (steps, tokens or FLOPs per configuration) into steps and warmup steps."""
    t, o = p.train, p.optim
    tokens_per_step = batch_size * p.model.context_length
    if t.budget_kind == "steps":
        per_step = 1.0
    elif t.budget_kind == "tokens":
        per_step = float(tokens_per_step)
    elif t.budget_kind == "tokens_per_param":
        per_step = tokens_per_step / n_params_nonembedding(p.model)
    else:  # flops: the usual 6 N D estimate
        per_step = 6.0 * n_params_estimate(p.model) * tokens_per_step
    steps = int(round(t.budget / per_step))
    if steps < 1:
        raise ConfigError(f"steps must be >= 1: a {t.budget_kind} budget of {t.budget:g} gives "
                          f"{t.budget / per_step:.3g} steps at batch_size {batch_size}")
    return steps, int(round(o.warmup / per_step))
