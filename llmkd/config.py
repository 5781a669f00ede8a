"""Run configuration: nested dataclasses mirrored by `configs/*.yaml`.

Unknown keys and wrong types are errors, never ignored. `--set section.field=value` overrides take
YAML values. The resolved config is saved with every artifact (`dataclasses.asdict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkd.artifacts import LlmkdError
from llmkd.config_schema import from_dict, read_yaml_mapping


@dataclass
class DataConfig:
    """Where the interactions and item text come from, and how item text is rendered."""

    source: str = "ml-100k"
    """'ml-100k' (the copy inside the recbole wheel) or 'files' (`interactions` + `items`)."""
    interactions: str | None = None
    """Interactions file (CSV / TSV / Parquet / JSONL) with columns user_id, item_id, timestamp."""
    items: str | None = None
    """Items file with columns item_id, title and optional others used by `text_template`."""
    text_template: str = "{title}"
    """Python format string over item columns, e.g. '{title} ({year}). Genres: {genres}'."""
    max_history: int = 50
    """Most recent train items a user tower sees."""
    cold_items: float = 0.0
    """Cold-start protocol: this fraction of the items (drawn at random among those with interactions)
    is withheld with all its interactions; it is kept aside in `data/` for `scripts/cold_start.py`."""
    cold_seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in ("ml-100k", "files"):
            raise LlmkdError(f"data.source: expected 'ml-100k' or 'files', got {self.source!r}")
        if self.source == "files" and not (self.interactions and self.items):
            raise LlmkdError("data: source 'files' needs both data.interactions and data.items")
        if self.max_history < 1:
            raise LlmkdError(f"data.max_history: expected >= 1, got {self.max_history}")
        if not 0.0 <= self.cold_items < 1.0:
            raise LlmkdError(f"data.cold_items: expected a fraction in [0, 1), got {self.cold_items}")


@dataclass
class TeacherConfig:
    """The pretrained language model that scores user-item pairs."""

    model: str = "minilm"
    """'minilm' (packaged all-MiniLM-L6-v2), 'smollm2' (packaged SmolLM2-135M-Instruct GGUF), a .gguf file
    or a local HF model folder."""
    pooling: str = "auto"
    """'mean' (encoders), 'last' (decoders) or 'auto' (from the model's architecture)."""
    user_mode: str = "text"
    """'text': encode the history rendered as text; 'mean_items': mean of history item embeddings."""
    item_template: str = "{text}"
    """Format string around an item's text when the teacher embeds it ('{text}' = the rendered item text)."""
    history_template: str = "{items}"
    """Format string for a user's history; '{items}' is replaced by item texts, most recent first."""
    history_separator: str = "; "
    max_history_items: int = 0
    """Most recent items rendered into a history text (0 = as many as the token budget holds)."""
    adapter: str | None = None
    """A PEFT LoRA adapter folder (from scripts/finetune_teacher.py) loaded on top of `model`."""
    max_item_tokens: int = 64
    max_history_tokens: int = 256
    """Token budget of a history text: the most recent items are kept."""
    position_stride: int = 0
    """Also encode each user's history at every `position_stride`-th train cut, counting back from the
    'kd' state, so KD can act at many positions of a sequence (0 = the 'kd' state only)."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.pooling not in ("auto", "mean", "last"):
            raise LlmkdError(f"teacher.pooling: expected 'auto', 'mean' or 'last', got {self.pooling!r}")
        if self.user_mode not in ("text", "mean_items"):
            raise LlmkdError(f"teacher.user_mode: expected 'text' or 'mean_items', got {self.user_mode!r}")
        if "{text}" not in self.item_template:
            raise LlmkdError("teacher.item_template: must contain the '{text}' placeholder")
        if "{items}" not in self.history_template:
            raise LlmkdError("teacher.history_template: must contain the '{items}' placeholder")
        if self.position_stride < 0:
            raise LlmkdError(f"teacher.position_stride: expected >= 0, got {self.position_stride}")


@dataclass
class FinetuneConfig:
    """LoRA tuning of the teacher: contrastive history text -> next item text (scripts/finetune_teacher.py)."""

    output: str = "teacher_lora"
    """Adapter folder under out_dir."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    """Dropout on LoRA inputs (0 by default: dropout ops made CPU steps 1.05-1.8x slower, README)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None picks the attention and MLP projections of known architectures."""
    top_layers: int = 0
    """Adapt only the top N transformer layers (0 = all); lower layers then need no backward pass."""
    cache_lower_layers: bool = True
    """With top_layers > 0: run the frozen lower layers once per text and cache their output, so a
    step costs the top layers only (training then draws from `cache_pairs` fixed history cuts)."""
    cache_pairs: int = 20000
    """Training (user, cut) pairs cached when cache_lower_layers is on (0 = all)."""
    warmup_steps: int = 20
    """Linear LR warm-up, then linear decay to 0 at `steps`."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    temperature: float = 0.05
    batch_size: int = 32
    catalog_negatives: int = 512
    """Extra negatives per step: items drawn uniformly without replacement, encoded by the current model."""
    lr: float = 5e-4
    steps: int = 300
    eval_every: int = 50
    patience: int = 3
    """Stop after this many evaluations without a better valid NDCG@10."""
    eval_users: int = 300
    """Valid users (a fixed random subset) scored for early stopping; 0 = all."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.steps < 1 or self.batch_size < 2 or self.eval_every < 1:
            raise LlmkdError("finetune: temperature > 0, steps >= 1, batch_size >= 2, eval_every >= 1 expected")


@dataclass
class StudentConfig:
    """The two-tower student (see `llmkd.student.TwoTower`)."""

    dim: int = 64
    pooling: str = "transformer"
    """User tower: 'transformer' (causal self-attention, SASRec-like) or 'mean' (recency-weighted)."""
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.3
    recency_decay: float = 0.0
    """'mean' pooling only: weight of an item k steps back is exp(-decay * k)."""
    use_user_id: bool = False
    content_features: bool = False
    """Add the teacher's frozen item-text embeddings to the item tower through a learned projection."""
    content_hidden: int = 0
    """Width of a hidden GELU layer in that projection (0 = a linear projection)."""
    content_init: float = 0.0
    """Initialise the item id embeddings from the teacher's item-text vectors: their top `dim` principal
    components, scaled to this standard deviation (0 = random, std 0.02). They then train as usual, so
    serving needs nothing of the teacher (LLM-embedding initialisation, Harte et al., RecSys 2023)."""
    id_dropout: float = 0.0
    """With content features: during training each item's id embedding is dropped with this probability
    (DropoutNet-style), so the text path learns to carry an item alone (cold items have no id)."""

    def __post_init__(self) -> None:
        if self.pooling not in ("transformer", "mean"):
            raise LlmkdError(f"student.pooling: expected 'transformer' or 'mean', got {self.pooling!r}")
        if self.content_init < 0:
            raise LlmkdError(f"student.content_init: expected a standard deviation >= 0, got {self.content_init}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise LlmkdError(f"student.id_dropout: expected a probability in [0, 1), got {self.id_dropout}")
        if self.dim % self.num_heads:
            raise LlmkdError(f"student.dim ({self.dim}) must be divisible by student.num_heads ({self.num_heads})")


@dataclass
class DistillConfig:
    """Training of the student: hard-label loss + alpha * KD loss, early stopping on valid."""

    name: str = "student_kd"
    """Artifact folder name under out_dir."""
    teacher: str = "teacher"
    """Teacher cache folder under out_dir whose scores (and item vectors) the student learns from."""
    alpha: float = 1.0
    """Weight of the KD loss; 0 trains the no-teacher twin."""
    temperature: float = 1.0
    """KD temperature T applied to both teacher and student scores (loss scaled by T^2)."""
    teacher_scale: float = 20.0
    """Teacher cosine scores are multiplied by this before the temperature (a cosine spans [-1, 1])."""
    kd_top_k: int = 100
    """Teacher candidates per KD position: its top-K unseen items by its own score (+ the positive)."""
    kd_loss: str = "listwise_kl"
    """KD loss, a name in `llmkd.losses.KD_LOSSES` (listwise_kl, ranking_distillation, relaxed_ranking,
    margin_mse, pairwise_hinge, infonce); its weight is `alpha`."""
    kd_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the KD loss (listwise_kl takes its temperature from `temperature`)."""
    user_align: float = 0.0
    """Weight of a second, multi-task objective: the student's user state, through a linear head,
    predicts the teacher's user vector at the same position (1 - cosine); the head is not exported."""
    item_align: float = 0.0
    """Weight of embedding alignment (DLLM2Rec-style): the student's item vectors, through a linear
    head, match the teacher's item-text embeddings (1 - cosine)."""
    loss: str = "full_softmax"
    """Hard-label loss: 'full_softmax' or 'sampled_softmax' (popularity-sampled negatives, logQ-corrected)."""
    num_negatives: int = 256
    epochs: int = 30
    patience: int = 5
    """Stop after this many epochs without a better valid NDCG@10."""
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    eval_batch_size: int = 256
    drop_last: bool = False
    """Drop each epoch's last incomplete batch. With several processes Accelerate otherwise pads that
    batch with repeated windows, so only drop_last runs match a one-process run exactly."""
    length_buckets: bool = False
    """Batch history windows of similar length together (shuffled within buckets of 50 batches, batch order
    shuffled) and drop each batch's all-padding columns: the same loss, far less work when most histories
    are much shorter than `data.max_history` (sparse catalogs)."""
    checkpoint_every: int = 0
    """Also checkpoint every N batches within an epoch (0 = at epoch ends only), for exact mid-epoch resume."""
    log_with: str | None = None
    """'tensorboard' to log through Accelerate's trackers."""

    def __post_init__(self) -> None:
        for name in ("alpha", "user_align", "item_align"):
            if getattr(self, name) < 0:
                raise LlmkdError(f"distill.{name}: expected >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise LlmkdError(f"distill.temperature: expected > 0, got {self.temperature}")
        self.make_kd_loss()  # an unknown loss or argument fails here, before any training
        if self.loss not in ("full_softmax", "sampled_softmax"):
            raise LlmkdError(f"distill.loss: expected 'full_softmax' or 'sampled_softmax', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise LlmkdError("distill: epochs, batch_size and grad_accum must be >= 1")

    @property
    def learns_from_teacher(self) -> bool:
        """True when a loss term reads the teacher's scores or vectors (KD or an alignment head)."""
        return self.alpha > 0 or self.user_align > 0 or self.item_align > 0

    def make_kd_loss(self):
        """The configured KD loss module (`llmkd.losses.build_kd_loss`)."""
        from llmkd.losses import build_kd_loss

        args = {"temperature": self.temperature, **self.kd_args} if self.kd_loss == "listwise_kl" else self.kd_args
        try:
            return build_kd_loss(self.kd_loss, **args)
        except LlmkdError as e:
            raise LlmkdError(f"distill.kd_loss / distill.kd_args: {e}") from None


@dataclass
class IndexConfig:
    """FAISS index over the student's item vectors."""

    type: str = "flat"
    """'flat' (exact inner product), 'hnsw' or 'ivf'."""
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 32
    ivf_nprobe: int = 8

    def __post_init__(self) -> None:
        if self.type not in ("flat", "hnsw", "ivf"):
            raise LlmkdError(f"index.type: expected 'flat', 'hnsw' or 'ivf', got {self.type!r}")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    batch_size: int = 256
    bootstrap: int = 1000
    """Resamples of users for the paired 95% interval of a metric difference."""
    students: list[str] = field(default_factory=lambda: ["student_no_kd", "student_kd"])
    """Student artifact folders (under out_dir) to evaluate; the indexed one is also evaluated through FAISS."""

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise LlmkdError(f"eval.ks: expected a non-empty list of positive cut-offs, got {self.ks}")


@dataclass
class Config:
    out_dir: str = "runs/ml100k"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.distill.kd_top_k < 1:
            raise LlmkdError(f"distill.kd_top_k: expected >= 1, got {self.distill.kd_top_k}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def uses_teacher(self) -> bool:
        """True when training reads the teacher cache: a teacher loss term or its item vectors as features."""
        return self.distill.learns_from_teacher or self.student.content_features or self.student.content_init > 0


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise LlmkdError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.alpha=0")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LlmkdError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def merge(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """`base` with `fragment`'s values laid over it, section by section (in place)."""
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (`scripts/tune.py` writes `<out_dir>/tune/recipe.yaml`) -> its config fragment."""
    raw = read_yaml_mapping(path, "recipe", " (scripts/tune.py writes <out_dir>/tune/recipe.yaml)")
    if not all(isinstance(v, dict) for v in raw.values()):
        raise LlmkdError(f"{path}: a recipe is a mapping of config sections, e.g. 'distill: {{alpha: 0.1}}'")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                recipe: str | Path | None = None) -> Config:
    """Read a YAML config (or defaults when `path` is None), lay a recipe file over it, apply
    overrides (in that order: `--set` wins), validate."""
    raw = read_yaml_mapping(path, "config") if path is not None else {}
    if recipe is not None:
        raw = merge(raw, load_recipe(recipe))
    raw = apply_overrides(raw, overrides or [])
    try:
        return from_dict(Config, raw)
    except LlmkdError as e:
        where = f"{path or 'config'}" + (f" + recipe {recipe}" if recipe is not None else "")
        raise LlmkdError(f"{where}: {e}") from None
