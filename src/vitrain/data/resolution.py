"""The size a run trains at, epoch by epoch, and the batch that goes with it.

data.image_size is the evaluation size; data.train_image_size the training size (DeiT III
pre-trains ViT-B at 192 px and fine-tunes at 224); data.resolution_schedule ramps the training
size over epochs (FFCV's progressive resizing: start until start_epoch, end from end_epoch, in
between linear, rounded to a multiple of `step`). data.batch_size_schedule: `constant` keeps
data.batch_size at every size; `scale_tokens` keeps the tokens per batch: data.batch_size is the
batch at the largest training size, a smaller size gets batch x (largest / size)^2 (rounded
down to an even multiple of the world size), and the learning rate follows the batch.
"""

from dataclasses import dataclass

from vitrain.errors import UserError

BATCH_SCHEDULES = ("constant", "scale_tokens")


@dataclass(frozen=True)
class ResolutionPlan:
    image_size: int
    train_image_size: int
    schedule: dict | None = None  # start, end, start_epoch, end_epoch, step
    batch_size_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.batch_size_schedule not in BATCH_SCHEDULES:
            raise UserError(
                f"data.batch_size_schedule={self.batch_size_schedule} is not one of "
                f"{', '.join(BATCH_SCHEDULES)}."
            )
        if self.schedule is not None:
            missing = {"start", "end", "start_epoch", "end_epoch", "step"} - set(self.schedule)
            if missing:
                raise UserError(
                    f"data.resolution_schedule needs {', '.join(sorted(missing))} too: e.g. "
                    "{start: 160, end: 192, start_epoch: 0, end_epoch: 10, step: 32}."
                )
            s = self.schedule
            if s["end_epoch"] < s["start_epoch"] or s["step"] < 1:
                raise UserError(
                    f"data.resolution_schedule={dict(s)}: end_epoch must not come before "
                    "start_epoch, and step must be a positive number of pixels."
                )

    @property
    def varies(self) -> bool:
        """Whether the training size changes between epochs (the loaders are rebuilt then)."""
        return self.schedule is not None and self.schedule["start"] != self.schedule["end"]

    @property
    def other_sizes(self) -> bool:
        """Whether the model sees sizes other than the evaluation size."""
        return self.varies or self.size(0) != self.image_size

    def size(self, epoch: int) -> int:
        """The training size of `epoch` (FFCV's get_resolution)."""
        if self.schedule is None:
            return self.train_image_size
        s = self.schedule
        if epoch <= s["start_epoch"]:
            return s["start"]
        if epoch >= s["end_epoch"]:
            return s["end"]
        fraction = (epoch - s["start_epoch"]) / (s["end_epoch"] - s["start_epoch"])
        size = s["start"] + fraction * (s["end"] - s["start"])
        return int(round(size / s["step"])) * s["step"]

    def sizes(self, epochs: int) -> list[int]:
        """Every training size of a run of `epochs` epochs, in order, each once."""
        return list(dict.fromkeys(self.size(e) for e in range(max(epochs, 1))))

    def global_batch(self, batch_size: int, epoch: int, world_size: int, even: bool) -> int:
        """The global batch of `epoch`: data.batch_size, or with scale_tokens the batch that
        holds as many tokens at this epoch's size as data.batch_size at the largest size."""
        if self.batch_size_schedule == "constant" or self.schedule is None:
            return batch_size
        largest = max(self.schedule["start"], self.schedule["end"])
        scaled = batch_size * (largest / self.size(epoch)) ** 2
        unit = world_size * (2 if even else 1)
        return max(unit, int(scaled // unit) * unit)


def plan_of(data_cfg) -> ResolutionPlan:
    """The resolution plan of a data config (sources without the keys train at image_size)."""
    get = data_cfg.get
    schedule = get("resolution_schedule")
    return ResolutionPlan(
        image_size=data_cfg["image_size"],
        train_image_size=get("train_image_size") or data_cfg["image_size"],
        schedule=dict(schedule) if schedule is not None else None,
        batch_size_schedule=get("batch_size_schedule") or "constant",
    )
