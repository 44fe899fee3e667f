"""Video clips decoded from filmstrips and from video files written here with PyAV: every frame's
grey level is its index, so each test reads back WHICH source frames a window took — the centre
window in evaluation, stride apart, the last frame repeated past a short clip's end — and that one
crop box serves every frame of a clip."""

import io
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from limoe.data.crops import crop_clip, crop_in_worker, draw_box
from limoe.data.preprocess import eval_crop
from limoe.data.video import UnusableVideo, count_frames, decode_frames, frame_indices, require_pyav
from limoe.errors import LimoeError
from tests.helpers import filmstrip_bytes as _filmstrip
from tests.helpers import frame_indices_shown as _indices
from tests.helpers import video_bytes as _video

av = pytest.importorskip("av")

def test_frame_indices_worked_by_hand():
    assert frame_indices(20, 4, 3, "centre") == [5, 8, 11, 14]  # span 10, slack 10: start 5
    assert frame_indices(15, 4, 3, "centre") == [2, 5, 8, 11]  # slack 5: start 2 (rounded down)
    assert frame_indices(10, 4, 3, "centre") == [0, 3, 6, 9]  # exactly the span
    assert frame_indices(5, 4, 2, "centre") == [0, 2, 4, 4]  # short: the last frame again
    assert frame_indices(1, 3, 5, "random", random.Random(0)) == [0, 0, 0]
    starts = {frame_indices(17, 3, 4, "random", random.Random(seed))[0] for seed in range(200)}
    assert starts == set(range(17 - 9 + 1))  # every window that fits, and no other


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_filmstrip_windows_are_stride_apart_and_centred_in_evaluation(format):
    data = _filmstrip(15, 13, extra_columns=5, format=format)  # 15 frames of 13 × 13; the 5 columns left over are no frame
    assert count_frames(data) == (15, 13, 13)
    clip = decode_frames(data, 4, 3, "centre")
    assert [frame.size for frame in clip] == [(13, 13)] * 4
    assert _indices(clip) == [2, 5, 8, 11]
    assert _indices(decode_frames(data, 3, 7, "centre")) == [0, 7, 14]
    assert _indices(decode_frames(data, 5, 4, "centre")) == [0, 4, 8, 12, 14]  # span 17 > 15: last frame repeated


@pytest.mark.parametrize("codec, format", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_video_file_windows_are_stride_apart_and_centred_in_evaluation(codec, format):
    data = _video(19, codec=codec, format=format)
    assert count_frames(data) == (19, 34, 22)
    assert _indices(decode_frames(data, 4, 3, "centre")) == [4, 7, 10, 13]  # span 10, slack 9: start 4
    assert _indices(decode_frames(data, 2, 1, "centre")) == [8, 9]
    assert _indices(decode_frames(_video(3, codec=codec, format=format), 4, 2, "centre")) == [0, 2, 2, 2]


def test_training_windows_are_random_stride_apart_and_seeded():
    data = _video(19)
    draws = random.Random(7)
    seen = [_indices(decode_frames(data, 3, 4, "random", draws)) for _ in range(40)]
    assert all(window == [window[0], window[0] + 4, window[0] + 8] and 0 <= window[0] <= 10 for window in seen)
    assert len({window[0] for window in seen}) > 5
    again = random.Random(7)
    assert [_indices(decode_frames(data, 3, 4, "random", again)) for _ in range(40)] == seen


def test_one_training_box_crops_every_frame():
    generator = np.random.default_rng(0)
    texture = generator.integers(0, 256, (29, 41, 3), dtype=np.uint8)  # odd sizes, not square
    frames = [Image.fromarray(np.roll(texture, index, axis=1)) for index in range(5)]  # moving texture
    torch.manual_seed(3)
    clip = crop_clip(frames, 17, train=True)
    assert clip.shape == (5, 3, 17, 17) and clip.dtype == np.uint8
    torch.manual_seed(3)
    box = draw_box(frames[0], 17)
    for frame, cropped in zip(frames, clip):
        assert np.array_equal(cropped, crop_in_worker(frame, box, 17).transpose(2, 0, 1))
    still = crop_clip([frames[0]] * 4, 17, train=True)  # a still clip: the same crop four times
    assert all(np.array_equal(still[0], other) for other in still[1:])
    assert not np.array_equal(still[0], crop_clip([frames[0]], 17, train=True)[0])  # another draw, another box


def test_evaluation_crops_each_frame_as_images_are():
    clip = decode_frames(_video(6, width=34, height=22), 3, 2, "centre")
    cropped = crop_clip(clip, 15, train=False)
    assert cropped.shape == (3, 3, 15, 15) and cropped.dtype == np.uint8
    for frame, crop in zip(clip, cropped):
        assert np.array_equal(crop, np.asarray(eval_crop(15)(frame)).transpose(2, 0, 1))


def _reason(data: bytes) -> str:
    with pytest.raises(UnusableVideo) as unusable:
        decode_frames(data, 2, 1, "centre")
    return unusable.value.args[0]


def test_unusable_clips_name_their_reason():
    tall = io.BytesIO()
    Image.new("RGB", (9, 10)).save(tall, format="PNG")  # narrower than high: not one square frame
    header_only = io.BytesIO()  # a stream but not a frame: FFmpeg does not open such a file
    with av.open(header_only, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=12)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.start_encoding()
    assert _reason(tall.getvalue()) == "empty_video"
    assert _reason(b"") == "bad_video"
    assert _reason(header_only.getvalue()) == "bad_video"
    assert _reason(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4) == "bad_video"
    assert _reason(_filmstrip(4, 8)[:60]) == "bad_video"  # a PNG cut short
    assert _reason(_video(8)[:200]) == "bad_video"
    sliver = io.BytesIO()
    Image.new("1", (70000, 1000)).save(sliver, format="PNG")  # 70 megapixels, more than an image may have
    assert _reason(sliver.getvalue()) == "video_too_large"


def test_reading_video_files_without_pyav_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av then raises ImportError
    with pytest.raises(LimoeError, match=r"pip install av$"):
        require_pyav()
    assert _indices(decode_frames(_filmstrip(3, 6), 3, 1, "centre")) == [0, 1, 2]  # filmstrips need no PyAV
