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

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config_schema import (
    DuplicateKeyError,
    bounded,
    check_bounds,
    from_dict,
    read_yaml_mapping,
    strict_load,
)


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
    max_history: int = bounded(50, ge=1)
    """Most recent train items a user tower sees."""
    cold_items: float = bounded(0.0, ge=0, lt=1)
    """Cold-start protocol: this fraction of the items (drawn at random among those with interactions)
    is withheld with all its interactions; it is kept aside in `data/` for `scripts/cold_start.py`."""
    cold_seed: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        check_bounds(self, "data")
        if self.source not in ("ml-100k", "files"):
            raise LlmkdError(f"data.source: expected 'ml-100k' or 'files', got {self.source!r}")
        if self.source == "files" and not (self.interactions and self.items):
            raise LlmkdError("data: source 'files' needs both data.interactions and data.items")


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
    max_history_items: int = bounded(0, ge=0)
    """Most recent items rendered into a history text (0 = as many as the token budget holds)."""
    adapter: str | None = None
    """A PEFT LoRA adapter folder (from scripts/finetune_teacher.py) loaded on top of `model`."""
    max_item_tokens: int = bounded(64, ge=1)
    max_history_tokens: int = bounded(256, ge=1)
    """Token budget of a history text: the most recent items are kept."""
    position_stride: int = bounded(0, ge=0)
    """Also encode each user's history at every `position_stride`-th train cut, counting back from the
    'kd' state, so KD can act at many positions of a sequence (0 = the 'kd' state only)."""
    batch_size: int = bounded(64, ge=1)
    shard_size: int = bounded(16384, ge=1)
    """Texts per shard: each shard is tokenized, encoded and written on its own (atomically), so memory is
    bounded by one shard, a killed run resumes from its finished shards, and several processes
    (`accelerate launch --num_processes N scripts/build_teacher.py`) share the shards out."""

    def __post_init__(self) -> None:
        check_bounds(self, "teacher")
        if self.pooling not in ("auto", "mean", "last"):
            raise LlmkdError(f"teacher.pooling: expected 'auto', 'mean' or 'last', got {self.pooling!r}")
        if self.user_mode not in ("text", "mean_items"):
            raise LlmkdError(f"teacher.user_mode: expected 'text' or 'mean_items', got {self.user_mode!r}")
        if "{text}" not in self.item_template:
            raise LlmkdError("teacher.item_template: must contain the '{text}' placeholder")
        if "{items}" not in self.history_template:
            raise LlmkdError("teacher.history_template: must contain the '{items}' placeholder")


@dataclass
class FinetuneConfig:
    """LoRA tuning of the teacher: contrastive history text -> next item text (scripts/finetune_teacher.py)."""

    output: str = "teacher_lora"
    """Adapter folder under out_dir."""
    lora_r: int = bounded(8, ge=1)
    lora_alpha: int = bounded(16, ge=1)
    lora_dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on LoRA inputs (0 by default: dropout ops made CPU steps slower, results/teacher_lora_step_cpu.json,
    docs/teachers.md)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None picks the attention and MLP projections of known architectures."""
    top_layers: int = bounded(0, ge=0)
    """Adapt only the top N transformer layers (0 = all); lower layers then need no backward pass."""
    cache_lower_layers: bool = True
    """With top_layers > 0: run the frozen lower layers once per text and cache their output, so a
    step costs the top layers only (training then draws from `cache_pairs` fixed history cuts)."""
    cache_pairs: int = bounded(20000, ge=0)
    """Training (user, cut) pairs cached when cache_lower_layers is on (0 = all)."""
    warmup_steps: int = bounded(20, ge=0)
    """Linear LR warm-up, then linear decay to 0 at `steps`."""
    max_grad_norm: float = bounded(1.0, ge=0)
    """Gradient clipping (0 = off)."""
    temperature: float = bounded(0.05, gt=0)
    batch_size: int = bounded(32, ge=2)
    """Training histories per step and process: N processes (`llmkd finetune --multi_gpu --num_processes N`)
    train on a global batch of N x batch_size, as one process would with that batch."""
    catalog_negatives: int = bounded(512, ge=0)
    """Extra negatives per step: items drawn uniformly without replacement, encoded by the current model
    (shared out between processes)."""
    lr: float = bounded(5e-4, gt=0)
    steps: int = bounded(300, ge=1)
    eval_every: int = bounded(50, ge=1)
    patience: int = bounded(3, ge=1)
    """Stop after this many evaluations without a better valid NDCG@10."""
    eval_users: int = bounded(300, ge=0)
    """Valid users (a fixed random subset) scored for early stopping; 0 = all."""
    seed: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        check_bounds(self, "finetune")


CONTENT_INIT_SOURCES = ("teacher", "shuffled", "random")
DEFAULT_INIT_STD = 0.02
"""The random item-id init's standard deviation (`llmkd.student.ItemTower`)."""


@dataclass
class StudentConfig:
    """The two-tower student (see `llmkd.student.TwoTower`)."""

    dim: int = bounded(64, ge=1)
    pooling: str = "transformer"
    """User tower: 'transformer' (causal pre-norm self-attention + MLP head), 'sasrec' (SASRec's own blocks, as the
    field trains it: `llmkd.student.sasrec`) or 'mean' (recency-weighted)."""
    attend_padding: bool = False
    """'sasrec' pooling: queries also attend to the padding, as SASRec does (it pads every history to max_len;
    a zero input's key and value, i.e. a learned "nothing to read" weighted by the number of pads)."""
    num_layers: int = bounded(2, ge=1)
    num_heads: int = bounded(2, ge=1)
    dropout: float = bounded(0.3, ge=0, lt=1)
    recency_decay: float = bounded(0.0, ge=0)
    """'mean' pooling only: weight of an item k steps back is exp(-decay * k)."""
    use_user_id: bool = False
    content_features: bool = False
    """Add the teacher's frozen item-text embeddings to the item tower through a learned projection."""
    content_hidden: int = bounded(0, ge=0)
    """Width of a hidden GELU layer in that projection (0 = a linear projection)."""
    content_init: float = bounded(0.0, ge=0)
    """Initialise the item id embeddings from the teacher's item-text vectors: their top `dim` principal
    components, scaled to this standard deviation (0 = random, std 0.02). They then train as usual, so
    serving needs nothing of the teacher (LLM-embedding initialisation, Harte et al., RecSys 2023)."""
    content_init_source: str = "teacher"
    """Controls for `content_init` and `distill.neighbor_smoothing` (same initialisation and smoothing, no item
    content): 'teacher' = the teacher's item vectors; 'shuffled' = the same vectors with their rows permuted
    across items (same spectrum and scale); 'random' = Gaussian rows with the teacher vectors' column means
    and standard deviations."""
    content_init_anchor: float = bounded(0.0, ge=0)
    """With `content_init`: add this weight x the mean over items of |e_i - e_i(0)|^2 to the training loss,
    pulling each id row toward its start from the teacher's vectors (a prior centred on the item's text, not
    on zero as weight decay is): rows the data says little about stay near their text. Training only."""
    content_init_whiten: bool = False
    """With `content_init`: scale each principal component to unit variance before the overall standard
    deviation (whitening), so every id dimension starts with the same spread."""
    init_std: float = bounded(DEFAULT_INIT_STD, gt=0)
    """Standard deviation of the random id-embedding init (without `content_init`): a twin setting the recipe
    search can tune, so an init-scale effect is not credited to the teacher."""
    id_dropout: float = bounded(0.0, ge=0, lt=1)
    """With content features: during training each item's id embedding is dropped with this probability
    (DropoutNet-style), so the text path learns to carry an item alone (cold items have no id)."""

    def __post_init__(self) -> None:
        check_bounds(self, "student")
        if self.pooling not in ("transformer", "sasrec", "mean"):
            raise LlmkdError(f"student.pooling: expected 'transformer', 'sasrec' or 'mean', got {self.pooling!r}")
        if self.attend_padding and self.pooling != "sasrec":
            raise LlmkdError(f"student.attend_padding: only with pooling 'sasrec', got {self.pooling!r}")
        if self.content_init_source not in CONTENT_INIT_SOURCES:
            raise LlmkdError(f"student.content_init_source: expected one of {', '.join(CONTENT_INIT_SOURCES)}, "
                             f"got {self.content_init_source!r}")
        if self.content_init_anchor and not self.content_init:
            raise LlmkdError("student.content_init_anchor: pulls the id rows toward their content_init start; "
                             "set student.content_init > 0 too")
        if self.dim % self.num_heads:
            raise LlmkdError(f"student.dim ({self.dim}) must be divisible by student.num_heads ({self.num_heads})")


@dataclass
class DistillConfig:
    """Training of the student: hard-label loss + alpha * KD loss, early stopping on valid."""

    name: str = "student_kd"
    """Artifact folder name under out_dir."""
    teacher: str = "teacher"
    """Teacher cache folder under out_dir whose scores (and item vectors) the student learns from."""
    alpha: float = bounded(1.0, ge=0)
    """Weight of the KD loss; 0 trains the no-teacher twin."""
    temperature: float = bounded(1.0, gt=0)
    """KD temperature T applied to both teacher and student scores (loss scaled by T^2)."""
    teacher_scale: float = bounded(20.0, gt=0)
    """Teacher cosine scores are multiplied by this before the temperature (a cosine spans [-1, 1])."""
    kd_top_k: int = bounded(100, ge=1)
    """Teacher candidates per KD position: its top-K unseen items by its own score (+ the positive)."""
    kd_index: str = "auto"
    """How the teacher's top-K candidates are found (a FAISS inner-product search over its item vectors,
    seen items removed): 'flat' (exact), 'ivf' (approximate: inverted lists, `kd_nprobe` visited) or
    'auto' (flat up to `kd_exact_max_items` items, ivf above)."""
    kd_exact_max_items: int = bounded(100_000, ge=0)
    kd_nprobe: int = bounded(32, ge=1)
    """'ivf' KD search: inverted lists visited per query (nlist = `llmkd.index.ivf_nlist`)."""
    neighbor_smoothing: float = bounded(0.0, ge=0, lt=1)
    """Smooth each next-item target toward its `neighbor_k` nearest items by the teacher's item vectors:
    (1 - eps) on the item, eps spread over its neighbours (`llmkd.losses.neighbor_smoothing`); 0 = off."""
    neighbor_k: int = bounded(10, ge=1)
    kd_loss: str = "listwise_kl"
    """KD loss, a name in `llmkd.losses.KD_LOSSES` (listwise_kl, ranking_distillation, relaxed_ranking,
    margin_mse, pairwise_hinge, infonce); its weight is `alpha`."""
    kd_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the KD loss (listwise_kl takes its temperature from `temperature`)."""
    user_align: float = bounded(0.0, ge=0)
    """Weight of a second, multi-task objective: the student's user state, through a linear head,
    predicts the teacher's user vector at the same position (1 - cosine); the head is not exported."""
    item_align: float = bounded(0.0, ge=0)
    """Weight of embedding alignment (DLLM2Rec-style): the student's item vectors, through a linear
    head, match the teacher's item-text embeddings (1 - cosine)."""
    loss: str = "auto"
    """Hard-label loss: 'full_softmax', 'sampled_softmax' (popularity-sampled negatives, logQ-corrected) or
    'auto': full softmax up to `sampled_above` items, sampled above (`hard_loss_for`)."""
    sampled_above: int = bounded(25_000, ge=0)
    """With loss 'auto': more items than this train with sampled softmax (above it a full-softmax step costs
    several times the sampled one: results/softmax_cost_cpu.json, docs/scaling.md)."""
    num_negatives: int = bounded(256, ge=1)
    item_updates: str = "auto"
    """How the student's item table learns: 'dense' (AdamW over every row at every step), 'sparse' (a step
    looks up only the rows it reads, so only they get gradients and Adam updates: torch SparseAdam, lazy
    moments) or 'auto' (sparse where allowed on more than `sampled_above` items: at 1 M items a dense step
    cost ~20x a sparse one, docs/scaling.md). Sparse needs the sampled softmax, no item_align, no
    weight_decay, no id_dropout with content features, and one process (`Config.item_updates_for`)."""
    epochs: int = bounded(30, ge=1)
    patience: int = bounded(5, ge=1)
    """Stop after this many epochs without a better valid NDCG@10."""
    batch_size: int = bounded(64, ge=1)
    lr: float = bounded(2e-3, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    grad_accum: int = bounded(1, ge=1)
    seed: int = bounded(0, ge=0)
    eval_batch_size: int = bounded(256, ge=1)
    valid_users: int = bounded(0, ge=0)
    """0: early stopping reads every valid user; N > 0: a fixed random sample of N of them (seed 0, the
    same for every run), for catalogs where a full validation per epoch costs more than the epoch."""
    drop_last: bool = False
    """Drop each epoch's last incomplete batch. With several processes Accelerate otherwise pads that
    batch with repeated windows, so only drop_last runs match a one-process run exactly."""
    length_buckets: bool = False
    """Batch history windows of similar length together (shuffled within buckets of 50 batches, batch order
    shuffled) and drop each batch's all-padding columns: the same loss, far less work when most histories
    are much shorter than `data.max_history` (sparse catalogs)."""
    length_groups: int = bounded(4, ge=1)
    """Run the user tower on each batch in this many groups of rows of similar history length, each without
    its all-padding columns (`TwoTower.grouped_states`): the same batches, loss and states (only dropout's
    draws differ), less work where most histories are much shorter than `data.max_history`; 1 = one
    full-width run."""
    checkpoint_every: int = bounded(0, ge=0)
    """Also checkpoint every N batches within an epoch (0 = at epoch ends only), for exact mid-epoch resume."""
    log_with: str | None = None
    """'tensorboard' to log through Accelerate's trackers."""

    def __post_init__(self) -> None:
        check_bounds(self, "distill")
        if self.loss not in ("auto", "full_softmax", "sampled_softmax"):
            raise LlmkdError(f"distill.loss: expected 'auto', 'full_softmax' or 'sampled_softmax', got {self.loss!r}")
        if self.kd_index not in ("auto", "flat", "ivf"):
            raise LlmkdError(f"distill.kd_index: expected 'auto', 'flat' or 'ivf', got {self.kd_index!r}")
        if self.item_updates not in ("auto", "dense", "sparse"):
            raise LlmkdError(f"distill.item_updates: expected 'auto', 'dense' or 'sparse', got {self.item_updates!r}")
        kd_loss = self.make_kd_loss()  # an unknown loss or argument fails here, before any training
        if self.alpha > 0:
            self.check_kd_term(kd_loss)

    def check_kd_term(self, kd_loss) -> None:
        """Refuse KD settings under which the KD loss is 0 whatever the scores (e.g. InfoNCE with every
        candidate a positive): alpha > 0 would train a student without its teacher and call it KD.
        The loss is tried once on random scores over the kd_top_k + 1 candidates of a position."""
        import torch

        student, teacher = torch.randn(2, 4, self.kd_top_k + 1, generator=torch.Generator().manual_seed(0))
        loss = kd_loss(student, teacher * self.teacher_scale, torch.ones_like(student, dtype=torch.bool))
        if float(loss) == 0.0:
            raise LlmkdError(
                f"distill.kd_loss {self.kd_loss!r} with distill.kd_args {self.kd_args} and distill.kd_top_k "
                f"{self.kd_top_k}: the KD term is 0 whatever the scores, so distill.alpha {self.alpha} would train "
                "without the teacher; change those settings, or set distill.alpha=0 for a no-teacher run")

    def hard_loss_for(self, num_items: int) -> str:
        """The hard-label loss a catalog of `num_items` items trains with ('auto' resolved)."""
        if self.loss != "auto":
            return self.loss
        return "sampled_softmax" if num_items > self.sampled_above else "full_softmax"

    def kd_index_for(self, num_items: int) -> str:
        """The KD candidate search of a catalog of `num_items` items: 'flat' or 'ivf' ('auto' resolved)."""
        if self.kd_index != "auto":
            return self.kd_index
        return "ivf" if num_items > self.kd_exact_max_items else "flat"

    @property
    def learns_from_teacher(self) -> bool:
        """True when a loss term reads the teacher's scores or vectors (KD or an alignment head)."""
        return self.alpha > 0 or self.user_align > 0 or self.item_align > 0

    def make_kd_loss(self):
        """The configured KD loss module (`llmkd.losses.build_kd_loss`)."""
        from llmkd.losses import build_kd_loss  # here, not at the top: serving reads configs, never the losses

        args = {"temperature": self.temperature, **self.kd_args} if self.kd_loss == "listwise_kl" else self.kd_args
        try:
            return build_kd_loss(self.kd_loss, **args)
        except LlmkdError as e:
            raise LlmkdError(f"distill.kd_loss / distill.kd_args: {e}") from None


INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")


@dataclass
class IndexConfig:
    """FAISS index over the student's item vectors (built with `faiss.index_factory`, `llmkd.index`).

    `scripts/ann_sweep.py` measures recall@10 and queries/s of each type and search setting on a
    catalog's vectors and writes the fastest one that reaches a target recall as an `index:` fragment
    for `--recipe`."""

    type: str = "flat"
    """'flat' (exact inner product), 'hnsw' (graph), 'ivf' (inverted lists, exact vectors) or 'ivfpq'
    (inverted lists, product-quantized codes: ~pq_m bytes an item)."""
    hnsw_m: int = bounded(32, ge=2)
    """Graph neighbours per node: more = better recall, more memory and build time."""
    hnsw_ef_construction: int = bounded(40, ge=1)
    """Candidate list while building the graph (FAISS's default 40)."""
    hnsw_ef_search: int = bounded(128, ge=1)
    """Candidate list while searching: the recall / speed knob of 'hnsw'."""
    ivf_nlist: int | None = bounded(None, ge=1)
    """Inverted lists (coarse clusters); null = round(4 * sqrt(n_items)). Always at most n_items / 39,
    since FAISS wants ~39 training vectors per list."""
    ivf_nprobe: int = bounded(8, ge=1)
    """Lists visited per query: the recall / speed knob of 'ivf' and 'ivfpq'."""
    ivf_train_per_list: int = bounded(64, ge=39)
    """Most training vectors per list for the coarse k-means (FAISS samples them): bounds training time
    on a large catalog (FAISS's own default, 256, makes k-means 4x longer)."""
    pq_m: int | None = bounded(None, ge=1)
    """'ivfpq': sub-quantizers (bytes per item with 8 bits); must divide the dimension; null = dim / 2."""
    pq_nbits: int = bounded(8, ge=1, le=16)
    """'ivfpq': bits per sub-quantizer code."""
    pq_refine: int = bounded(0, ge=0)
    """'ivfpq': 0 = rank by the codes; k > 0 = re-rank the top k x K by exact inner product with the
    stored float vectors (FAISS 'RFlat'; costs the flat index's memory on top of the codes)."""
    ip_to_l2: bool = False
    """'hnsw', 'ivf', 'ivfpq': search an L2 index over the item vectors extended by one coordinate,
    sqrt(max_norm^2 - |x|^2), so that nearest in L2 = highest inner product (`llmkd.index.MipsIndex`);
    false = FAISS's inner-product metric. Which is better depends on the vectors, so `scripts/ann_sweep.py`
    measures both: the reduction wins where a few long (popular) items top most users' lists (the 1 M-item
    synthetic student: IVF recall@10 0.95 at nprobe 4 vs 0.55 at 256 by inner product) and loses where norms
    are alike (the Beauty student: IVF nprobe 16 0.55 vs 0.92); HNSW differs less (docs/scaling.md)."""

    def __post_init__(self) -> None:
        check_bounds(self, "index")
        if self.type not in INDEX_TYPES:
            raise LlmkdError(f"index.type: expected 'flat', 'hnsw', 'ivf' or 'ivfpq', got {self.type!r}")

@dataclass
class EvalConfig:
    ks: list[int] = bounded(default_factory=lambda: [10, 20, 50], ge=1)
    batch_size: int = bounded(256, ge=1)
    item_block: int = bounded(65536, ge=1)
    """Items scored at once per batch of users: memory is batch_size x item_block scores, never the
    whole catalog for every user (a catalog within one block is ranked exactly as before)."""
    bootstrap: int = bounded(1000, ge=1)
    """Resamples of users for the paired 95% interval of a metric difference."""
    max_users: int = bounded(0, ge=0)
    """0: every evaluated user. N > 0: a fixed random sample of N of them per split (`sample_seed`), the
    same for every system, stated in results.md and protocol.json (1 M users x 1 M items is days on a CPU)."""
    sample_seed: int = bounded(0, ge=0)
    students: list[str] = field(default_factory=lambda: ["student_no_kd", "student_kd"])
    """Student artifact folders (under out_dir) to evaluate; the indexed one is also evaluated through FAISS."""

    def __post_init__(self) -> None:
        check_bounds(self, "eval")
        if not self.ks:
            raise LlmkdError("eval.ks: expected a non-empty list of positive cut-offs, got []")


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sparse_items_blocker(self, num_items: int, num_processes: int = 1) -> str | None:
        """Why this run's item table cannot learn sparsely (`distill.item_updates`), or None."""
        dc = self.distill
        if dc.hard_loss_for(num_items) != "sampled_softmax":
            return "the full softmax scores every item at every step (set distill.loss: sampled_softmax)"
        if dc.item_align > 0:
            return "distill.item_align reads every item vector at every step"
        if dc.weight_decay > 0 or self.student.content_init_anchor > 0:
            return "SparseAdam has no weight decay (distill.weight_decay or student.content_init_anchor > 0)"
        if self.student.content_features and self.student.id_dropout > 0:
            return "student.id_dropout drops rows over the whole table"
        if num_processes > 1:
            return "several processes: NCCL cannot all-reduce sparse gradients"
        return None

    def item_updates_for(self, num_items: int, num_processes: int = 1, strict: bool = True) -> str:
        """'dense' or 'sparse': how the item table of a `num_items` catalog learns ('auto' resolved; with
        `strict`, an explicit 'sparse' that cannot be honoured is an error naming the reason)."""
        mode, blocker = self.distill.item_updates, self.sparse_items_blocker(num_items, num_processes)
        if mode == "sparse" and blocker and strict:
            raise LlmkdError(f"distill.item_updates 'sparse': {blocker}; use 'auto' or 'dense'")
        if mode == "auto":
            return "sparse" if blocker is None and num_items > self.distill.sampled_above else "dense"
        return mode

    @property
    def uses_teacher(self) -> bool:
        """True when training reads the teacher cache: a teacher loss term or its item vectors as features."""
        return (self.distill.learns_from_teacher or self.distill.neighbor_smoothing > 0
                or self.student.content_features or self.student.content_init > 0)


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
        try:
            node[parts[-1]] = strict_load(value)
        except yaml.YAMLError as e:
            detail = str(e) if isinstance(e, DuplicateKeyError) else "invalid YAML value"
            raise LlmkdError(f"--set {item!r}: {detail}") from None
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
