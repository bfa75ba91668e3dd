"""Run tracking beside metrics.jsonl: TensorBoard or Weights & Biases (`--report_to`), and a
loss curve picture at the end of a run when matplotlib is installed. Each is an optional
package, imported only when asked for.

The tracker gets exactly the records metrics.jsonl gets (every number in them becomes a
scalar of the same name at that step), the run's settings once, and text such as the
before/after samples. W&B takes its usual environment (WANDB_PROJECT, WANDB_MODE=offline...).
"""
import json
import os
from pathlib import Path

from nanolora.files import atomic_path

REPORT_TO = ("none", "tensorboard", "wandb")
NOT_SCALARS = ("step", "total_steps")


class Tracker:
    def __init__(self, report_to: str, out, settings: dict):
        self.report_to, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
            # TensorBoard renders text as markdown: indented by four spaces it stays as written
            self.text("settings", json.dumps(settings, indent=2))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report_to wandb needs the wandb package: pip install wandb") from None
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanolora"), dir=str(out), config=settings)

    def log(self, record: dict):
        scalars = {k: v for k, v in record.items() if k not in NOT_SCALARS and isinstance(v, (int, float))}
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, record["step"])
            self.writer.flush()
        if self.run:
            self.run.log(scalars, step=record["step"])

    def text(self, name: str, text: str):
        if self.writer:
            self.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()))
        if self.run:
            self.run.summary[name] = text

    def close(self):
        if self.writer:
            self.writer.close()
        if self.run:
            self.run.finish()


def plot_loss(metrics_file, png, eval_points=()) -> bool:
    """Train loss (and eval loss: the records' eval_loss plus `eval_points`, (step, loss)
    pairs such as before and after training) over steps, as a PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    evals = sorted([*eval_points, *((r["step"], r["eval_loss"]) for r in records if "eval_loss" in r)])
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o--", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss per label token")
    axes.grid(alpha=0.3)
    axes.legend()
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(figure)
    return True
