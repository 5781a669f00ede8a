"""Stopping the recipe search's losing candidates early: Optuna's asynchronous successive halving (ASHA).

Every candidate of a pruned search is one trial of an Optuna study kept in a journal file beside the
search's runs (`<out_dir>/<folder>/pruning.journal`), which the worker processes of `--jobs N` share.
After each epoch the training loop reports the candidate's valid NDCG@10 (`distill.train(on_epoch=...)`);
at the rungs `min_epochs` x `reduction_factor`^k epochs the pruner stops a candidate whose value is not in
the top 1 / `reduction_factor` of the values the candidates that reached that rung before it had there.
So the first candidate (the configured twin) always trains to its early stop, and a later one goes on
only while it keeps up with the best so far. A finished run the search reuses instead of training joins the
study with its recorded curve (`add_finished`), so it holds later candidates to that curve as well. A stopped
candidate exports its best epoch as usual, marked `pruned_at_epoch` in meta.json; the search never chooses
it, and a run without pruning resumes it from its checkpoint instead of taking it as finished (`llmkd.infra.reuse`).

Optuna rather than a scheduler of our own: it is the field's well-kept implementation of ASHA (Li et al.,
2020), and its journal storage is safe across processes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import Config


@dataclass(frozen=True)
class Pruning:
    """Where the study lives and how it prunes (picklable: it travels to the worker processes)."""

    journal: str
    """The study's journal file (created on first use)."""
    min_epochs: int = 5
    """The first rung: no candidate is stopped before this many epochs."""
    reduction_factor: int = 3
    """Rungs at min_epochs x reduction_factor^k epochs; each keeps the top 1 / reduction_factor."""
    study: str = "recipe-search"

    def __post_init__(self) -> None:
        if self.min_epochs < 1 or self.reduction_factor < 2:
            raise LlmkdError(f"pruning: expected min_epochs >= 1 and reduction_factor >= 2, got "
                             f"{self.min_epochs} and {self.reduction_factor}")

    def open(self):
        """The study (created in the journal if it is not there yet)."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        Path(self.journal).parent.mkdir(parents=True, exist_ok=True)
        return optuna.create_study(
            study_name=self.study, direction="maximize", load_if_exists=True,
            storage=JournalStorage(JournalFileBackend(self.journal)),
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_epochs,
                                                          reduction_factor=self.reduction_factor))


def train_pruned(cfg: Config, pruning: Pruning, resume: bool = False) -> dict:
    """`distill.train` as one trial of the pruned study: each epoch reported, stopped when the pruner says
    so; the trial is told its best valid NDCG@10, or that it was pruned (or failed)."""
    from optuna.trial import TrialState

    from llmkd.distill import train

    study = pruning.open()
    trial = study.ask()
    trial.set_user_attr("run", cfg.distill.name)

    def on_epoch(epoch: int, ndcg: float) -> bool:
        trial.report(ndcg if math.isfinite(ndcg) else float("nan"), epoch)  # a diverged epoch: pruned
        return trial.should_prune()

    try:
        result = train(cfg, resume=resume, on_epoch=on_epoch)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    if result["pruned_at_epoch"]:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, result["best_valid_ndcg@10"])
    return result


def add_finished(pruning: Pruning, folder: Path, run: str) -> bool:
    """A finished run (its `meta.json` history of valid NDCG@10 per epoch) as a completed trial of the study,
    with the value it had at each rung it reached, as if the pruner had watched it train: a run the search
    reuses then holds later candidates to its curve like one the search trained. Once per `run` (the name a
    trained trial carries too); False when it is there already, or the run was pruned or has no history."""
    import optuna
    from optuna.pruners._successive_halving import _completed_rung_key  # where the pruner keeps rung values

    meta = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))
    curve = {int(h["epoch"]): float(h["ndcg@10"]) for h in meta.get("history", [])
             if math.isfinite(h.get("ndcg@10", float("nan")))}
    if not curve or meta.get("pruned_at_epoch"):
        return False
    study = pruning.open()
    if any(t.user_attrs.get("run") == run for t in study.get_trials(deepcopy=False)):
        return False
    rungs, rung = {}, 0
    while (epoch := pruning.min_epochs * pruning.reduction_factor ** rung) in curve:
        rungs[_completed_rung_key(rung)] = curve[epoch]
        rung += 1
    study.add_trial(optuna.trial.create_trial(value=float(meta["best_valid_ndcg@10"]), intermediate_values=curve,
                                              user_attrs={"run": run}, system_attrs=rungs))
    return True


def add_prune_options(p) -> None:
    """--prune and its rungs, for the scripts that run a recipe search (`pruning_from` reads them)."""
    p.add_argument("--prune", action="store_true",
                   help="stop candidates that fall behind early (llmkd.distill.pruning)")
    p.add_argument("--prune-min-epochs", type=int, default=Pruning.min_epochs,
                   help="with --prune: the first rung, in epochs (rungs at this x factor^k)")
    p.add_argument("--prune-factor", type=int, default=Pruning.reduction_factor,
                   help="with --prune: each rung keeps the top 1/factor")


def pruning_from(args, journal: Path) -> Pruning | None:
    """The search's Pruning (its study in `journal`) when --prune was given, else None."""
    return Pruning(str(journal), args.prune_min_epochs, args.prune_factor) if args.prune else None
