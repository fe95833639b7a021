"""Where a run's metrics go: metrics.jsonl always (the record `vipo plot` reads), TensorBoard
and Weights & Biases when `train.report_to` asks. Only rank 0 writes; each sink's package is
imported when asked for, so neither is a dependency of training."""

import importlib.util
import json
import logging
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vipo[track]'"


SINK_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_sinks_installed(report_to) -> None:
    """Before anything is built (a model, a data set): a sink whose package is missing is one
    line at start-up, not an error after minutes of loading."""
    for sink in report_to:
        if importlib.util.find_spec(SINK_MODULES[sink]) is None:
            raise ConfigError(f"train.report_to has {sink}, which is not installed ({INSTALL_HINT})")


class MetricSinks:
    def __init__(
        self,
        out_dir: Path,
        report_to: list[str],
        *,
        run_name: str | None = None,
        config: dict | None = None,
        append: bool = False,
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        """`append`: a resumed run. Rows after `resume_step` (written by the run that stopped after
        its last checkpoint) and a half-written last line are dropped first, so every step has
        one row."""
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        if append and resume_step is not None and path.is_file():
            _truncate_rows(path, resume_step)
        self._jsonl = open(path, "a" if append else "w", encoding="utf-8")
        name = run_name or self.out_dir.resolve().name
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    f"train.report_to has tensorboard, which is not installed ({INSTALL_HINT})"
                ) from err
            # purge_step: a resumed run hides the events the stopped run logged past its checkpoint.
            purge = resume_step + 1 if append and resume_step is not None else None
            self._tensorboard = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ConfigError(
                    f"train.report_to has wandb, which is not installed ({INSTALL_HINT})"
                ) from err
            # A resumed run continues the same wandb run: its id is kept in the run folder.
            id_file = self.out_dir / "wandb-run-id"
            run_id = id_file.read_text().strip() if append and id_file.is_file() else None
            self._wandb = wandb.init(
                name=name, id=run_id, resume="allow" if run_id else None, config=config, dir=str(self.out_dir)
            )
            id_file.write_text(self._wandb.id)

    def write(self, row: dict) -> None:
        """One log row: {"step": int, metric: float, ...}."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()  # a crash loses at most the row being written
        step = int(row["step"])
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def image(self, tag: str, image, step: int) -> None:
        """An [H, W, 3] uint8 image (a validation grid) to TensorBoard and wandb; metrics.jsonl
        holds numbers only (the image's file is the caller's)."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, image, step, dataformats="HWC")
            self._tensorboard.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricSinks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_rows(path: Path, last_step: int) -> None:
    """Keep the rows of metrics.jsonl up to `last_step`; drop later ones and a torn last line."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", 0)) <= last_step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        log.info(
            "%s: dropped %d rows past step %d (the stopped run's, after its checkpoint)",
            path,
            dropped,
            last_step,
        )
