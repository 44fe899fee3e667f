"""What many tests share, defined once: the settings of a short training run, the fixed setup that
runs on one and two processes compare under (and the cases a test and its subprocess worker both
compute), running `limoe` in this process, the check that bad input ends in one line and exit
status 2, a run killed right after a checkpoint, config files written as YAML, an image-text
model widened by one more modality, and video clips whose frames tell their index.

Imported by test modules and by the subprocess workers alike (a worker never imports a test module,
nor a test module a worker), so it imports nothing from either.
"""

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from limoe.cli import main
from limoe.config import Config, load_config
from limoe.evaluate.turns import encode_in_turns
from limoe.model.tower import Limoe, build_model

ROOT = Path(__file__).resolve().parents[1]
AUDIO_HELDOUT = ROOT / "data_shards" / "audio_heldout"  # 64 clips of instruments no demo run hears, with .cls families
VIDEO_HELDOUT = ROOT / "data_shards" / "video_heldout"  # 192 filmstrips of sprites moving, with .cls directions
# A video model at odd sizes: 24 px frames in 8 px patches (a 3 × 3 grid), clips of 6 consecutive
# frames in tubelets of 2 (3 steps): 27 tokens a clip.
VIDEO_MODEL = ["modalities=[image, text, video]", "image_size=24", "video.frames=6", "video.frame_stride=1",
               "video.tubelet_frames=2"]


def _quick(every: int) -> list[str]:
    """No loader processes; a metrics record, a checkpoint and routing statistics every `every`
    steps, and the warmup over by the first of them: a run of a few steps still writes each."""
    return ["data.workers=0", f"train.log_every={every}", f"train.checkpoint_every={every}",
            f"train.routing_stats_every={every}", f"optim.warmup_steps={every}"]


# A short `limoe train` / `limoe pretrain` of the demo config on the shipped shards, batch 16
# (two routing groups of limoe-tiny's 8).
QUICK = ["train.batch_size=16", *_quick(2)]
# The same with everything written after each step (a one-step run still leaves every file).
QUICK_EVERY_STEP = ["train.batch_size=16", *_quick(1)]
# Co-training: each task sets its own batch size.
QUICK_TASKS = _quick(2)

# Runs of one fixed global batch that must agree however they are laid out on processes,
# micro-batches or checkpointed blocks (the distributed workers and their one-process twins).
GLOBAL_BATCH = 16
COMPARABLE = [
    "model.moe.router_noise=false",  # noise would differ between the runs
    "model.moe.group_size=2",  # 16 examples → the same 8 routing groups on 1 or 2 ranks, and in micro-batches of 2
    "model.moe.train_capacity_factor=1.0",
    f"train.batch_size={GLOBAL_BATCH}",
    "train.device=cpu",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "optim.eps=1.0e-3",  # Adam's first step is g/(|g|+eps): a tiny eps turns rounding noise into ±lr
    "optim.grad_clip=0.5",  # below the first step's norm, so clipping acts
    "data.workers=0",
]


# The reshape-resume check: steps before its checkpoint, then steps after it in each run.
RESHAPE_SAVED_AT = 2
RESHAPE_CONTINUED = 2


def fixed_batch(config) -> tuple[torch.Tensor, torch.Tensor]:
    """GLOBAL_BATCH seeded images [B, 3, H, W] uint8 and captions [B, L] of 8 tokens each."""
    generator = torch.Generator().manual_seed(1234)
    size = config.model.image_size
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, size, size), generator=generator, dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (GLOBAL_BATCH, config.model.context_length), generator=generator)
    tokens[:, 9:] = 0
    return images, tokens


def rank_rows(rank: int, world_size: int) -> slice:
    """The rows of a GLOBAL_BATCH batch that process `rank` of `world_size` trains on."""
    return slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)


# Taking turns at an evaluation (tests/evaluate/test_turns.py and its worker): known batches, and
# what encoding them taking turns gives.
# Two processes: batches 0-1 and 2-3 are dealt; 4 and 5 differ in size, both encode them.
TURN_SIZES = (4, 4, 4, 4, 4, 3)


def _turn_batches() -> list[torch.Tensor]:
    return [torch.arange(size, dtype=torch.float32) + 10 * index for index, size in enumerate(TURN_SIZES)]


def encode_turn_batches(shared: bool) -> tuple[list[int], list[list[list[float]]]]:
    """(indices of the batches this process encoded, each batch's two encodings): the second
    encoding's length varies from batch to batch (index mod 3 rows), as retrieval's new images do."""
    encoded = []

    def encode(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(batch[0]) // 10
        encoded.append(index)
        return batch[:, None] * 2, batch[: index % 3, None].repeat(1, 3)  # [n, 1], [index mod 3, 3]

    results = [[first.tolist(), second.tolist()] for _, (first, second) in
               encode_in_turns(_turn_batches(), encode, lambda batch: len(batch), shared)]
    return encoded, results


# A masked-pretraining decoder small enough for a test's few steps.
TINY_DECODER = ["pretrain.decoder_width=32", "pretrain.decoder_depth=1", "pretrain.decoder_heads=2"]


def metric_records(workdir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def set_options(*overrides: str) -> list[str]:
    """`--set` before each override, as a user types them."""
    return [arg for override in overrides for arg in ("--set", override)]


def run_args(command: str, workdir: Path, *overrides: str, config: str | Path | None = None) -> list[str]:
    """The arguments of `limoe train` / `limoe pretrain` in `workdir`, from `config` if given."""
    return [command, *(["--config", str(config)] if config is not None else []), "--workdir", str(workdir),
            *set_options(*overrides)]


def _limoe(argv: list[str]) -> tuple[int, str, str]:
    """`limoe argv` in this process, as from the shell: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def run_limoe(argv: list[str], status: int = 0) -> str:
    """Run `limoe argv` in this process: it must exit with `status`; returns what it printed on stdout."""
    returned, out, err = _limoe(argv)
    assert returned == status, err[-3000:]
    return out


def refused(argv: list[str], *expected: str, after_progress: bool = False) -> str:
    """Run `limoe argv` in this process: exit status 2 and, on stderr, one line `limoe: error: …`
    holding every `expected` text, no traceback; returns that line.

    With `after_progress`, the refusal may come once training has started: the progress lines
    drawn before it are allowed, and the error line must be the last."""
    status, _, err = _limoe(argv)
    assert status == 2, err[-3000:]
    return error_line(err, *expected, after_progress=after_progress)


def error_line(err: str, *expected: str, after_progress: bool = False) -> str:
    """The check of `refused` on stderr text `err` (for a refusal not made through `main`)."""
    assert "Traceback" not in err, err
    if after_progress:
        lines = err.replace("\r", "\n").splitlines()
        errors = [line for line in lines if "limoe: error" in line]
        assert len(errors) == 1 and lines[-1] == errors[0], err
        line = errors[0]
    else:
        assert err.count("\n") == 1 and err.endswith("\n"), err
        line = err[:-1]
    assert line.startswith("limoe: error: "), err
    for text in expected:
        assert text in line, err
    return line


class Killed(BaseException):
    """Stands for a SIGKILL right after a checkpoint is published: nothing after it runs."""


def killed_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the run in this process die (`Killed`) once its checkpoint of `step` is published;
    `monkeypatch.undo()` lets the next run live."""
    from limoe.checkpoints import training as checkpoint

    save = checkpoint.save_training_checkpoint

    def save_then_die(engine, workdir, saved_step, config, progress, objective):
        save(engine, workdir, saved_step, config, progress, objective)
        if saved_step == step:
            raise Killed

    monkeypatch.setattr(checkpoint, "save_training_checkpoint", save_then_die)


def shard_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} of every sample in the shards of `folder`, in shard order, read
    from the tar files directly (not through limoe's loader)."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar*")):
        with tarfile.open(shard) as source:
            for member in source.getmembers():
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = source.extractfile(member).read()
    return members


def write_config(path: Path, config: dict) -> str:
    """`config` as a YAML config file at `path` (what a user writes by hand); returns the path as
    `--config` and load_config take it."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


EXTRA = {  # one more modality at small odd sizes: its model overrides, and the shape of one input at 64 px
    "audio": (["modalities=[image, text, audio]", "audio.clip_seconds=0.37", "audio.n_mels=48"], (5920,)),
    "video": (["modalities=[image, text, video]", "video.frames=6", "video.tubelet_frames=3"], (6, 3, 64, 64)),
}


def image_text_and_widened(extra: str) -> tuple[Config, Limoe, Config, Limoe]:
    """The demo's image-text model and one that also embeds `extra` (a key of `EXTRA`), holding
    the same weights where they share them: the image-text model's, and `extra`'s as seeded."""
    image_text = load_config("demo")
    widened = load_config("demo", [f"model.{override}" for override in EXTRA[extra][0]])
    torch.manual_seed(0)
    small, large = build_model(image_text), build_model(widened)
    missing, unexpected = large.load_state_dict(small.state_dict(), strict=False)
    assert not unexpected and missing and all(extra in key for key in missing)
    return image_text, small, widened, large


# Video clips whose every frame's grey level tells its index, so that a test reads back which
# source frames a window took.
FRAME_LEVEL_STEP = 13  # grey levels from one frame to the next: 19 frames fit in 8 bits, and codecs round by less


def _frame_level(index: int) -> int:
    return 5 + FRAME_LEVEL_STEP * index


def frame_indices_shown(clip) -> list[int]:
    """The source frame each frame of `clip` (PIL images, or [T, 3, S, S] uint8) shows, from its mean grey level."""
    return [round((np.asarray(frame, dtype=np.float64).mean() - 5) / FRAME_LEVEL_STEP) for frame in clip]


def filmstrip_bytes(count: int, side: int, extra_columns: int = 0, format: str = "PNG") -> bytes:
    """A filmstrip of `count` grey side × side frames; `extra_columns` of red after them make no frame."""
    strip = Image.new("RGB", (count * side + extra_columns, side), (250, 0, 0))
    for index in range(count):
        strip.paste(Image.new("RGB", (side, side), (_frame_level(index),) * 3), (index * side, 0))
    out = io.BytesIO()
    strip.save(out, format=format, quality=95)
    return out.getvalue()


def video_bytes(count: int, width: int = 34, height: int = 22, codec: str = "libx264", format: str = "mp4") -> bytes:
    """A video file of `count` grey frames, written with PyAV."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=format) as container:
        stream = container.add_stream(codec, rate=12)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(count):
            pixels = np.full((height, width, 3), _frame_level(index), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()
