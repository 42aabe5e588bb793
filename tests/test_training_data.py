"""Training data pipeline: index (both layouts, bad files, cache), augmentation, sampler, datasets."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import training.data.index as data
from models.inference.preprocess import preprocess_image
from reference import require_data
from training.augment import augment, hflip, shift_scale_rotate, vflip
from training.data import (
    DistillDataset,
    FinetuneDataset,
    Item,
    ResumableSampler,
    build_index,
    letterbox_labels,
    load_item,
    modality_weights,
)


# --------------------------------------------------------------------------- synthetic files
def image2d(h=30, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def labels2d(h=30, w=40):
    gts = np.zeros((h, w), dtype=np.uint8)
    gts[5:12, 6:15] = 1
    gts[18:25, 20:35] = 2
    return gts


def volume(d=6, h=20, w=24, fg_slices=(1, 2, 4)):
    imgs = np.random.default_rng(1).integers(0, 256, (d, h, w), dtype=np.uint8)
    gts = np.zeros((d, h, w), dtype=np.uint16)
    for z in fg_slices:
        gts[z, 4:10, 5:12] = 1 + z % 2
    return imgs, gts


def save(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def train_root(tmp_path):
    """Training layout: one file per case holding imgs and gts, below <Modality> folders."""
    root = tmp_path / "train_npz"
    imgs, gts = volume()
    save(root / "CT" / "AbdomenSet" / "CT_AbdomenSet_0001.npz", imgs=imgs, gts=gts, spacing=np.ones(3))
    save(root / "XRay" / "XRay_chest_0001.npz", imgs=image2d(), gts=labels2d())
    save(root / "XRay" / "XRay_chest_0002.npz", imgs=image2d()[..., 0], gts=labels2d())  # grey 2D
    save(root / "XRay" / "XRay_chest_empty.npz", imgs=image2d(), gts=np.zeros((30, 40), np.uint8))
    save(root / "Misc" / "2DBox_US_0003.npz", imgs=image2d(), gts=labels2d())  # modality from the name
    save(root / "Weird" / "foo.npz", imgs=image2d(), gts=labels2d())  # unknown: top folder as written
    return root


@pytest.fixture
def eval_root(tmp_path):
    """Evaluation layout: imgs/<case>.npz and gts/<case>.npz."""
    root = tmp_path / "eval"
    save(root / "imgs" / "2DBox_Dermoscopy_a.npz", imgs=image2d(), boxes=np.array([[6, 5, 14, 11]]))
    save(root / "gts" / "2DBox_Dermoscopy_a.npz", gts=labels2d())
    imgs, gts = volume(fg_slices=(0, 5))
    save(root / "imgs" / "3DBox_MR_b.npz", imgs=imgs, spacing=np.ones(3))
    save(root / "gts" / "3DBox_MR_b.npz", gts=gts, spacing=np.ones(3))
    save(root / "imgs" / "2DBox_US_nogt.npz", imgs=image2d())  # no gts file
    return root


def logger():
    lines: list[str] = []
    return lines, lines.append


# --------------------------------------------------------------------------- index
def test_index_training_layout(train_root, tmp_path):
    lines, log = logger()
    items = build_index([train_root], cache_dir=tmp_path / "cache", log=log)
    ct = [it for it in items if it.z is not None]
    assert [it.z for it in ct] == [1, 2, 4]  # only slices with foreground
    assert {it.modality for it in ct} == {"CT"}
    flat = {Path(it.path).name: it.modality for it in items if it.z is None}
    assert flat == {
        "XRay_chest_0001.npz": "X-Ray",
        "XRay_chest_0002.npz": "X-Ray",
        "2DBox_US_0003.npz": "US",
        "foo.npz": "Weird",
    }
    assert all(it.labels_path is None for it in items)
    assert items == sorted(items, key=lambda it: (it.path, -1 if it.z is None else it.z))
    assert not any(line.startswith("skip") for line in lines)
    image, labels = load_item(ct[0])
    assert image.shape == (20, 24, 3) and image.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(image[..., 0], image[..., 2]) and labels.max() > 0
    grey = next(it for it in items if it.path.endswith("0002.npz"))
    image, labels = load_item(grey)
    assert image.shape == (30, 40, 3) and labels.shape == (30, 40)


def test_index_eval_layout(eval_root, tmp_path):
    lines, log = logger()
    items = build_index(eval_root, cache_dir=tmp_path / "cache", log=log)
    assert [(Path(it.path).name, it.z, it.modality) for it in items] == [
        ("2DBox_Dermoscopy_a.npz", None, "Dermoscopy"),
        ("3DBox_MR_b.npz", 0, "MR"),
        ("3DBox_MR_b.npz", 5, "MR"),
    ]
    assert all(Path(it.labels_path).parent.name == "gts" for it in items)
    assert any("2DBox_US_nogt.npz" in line and "no ground truth" in line for line in lines)
    image, labels = load_item(items[2])
    assert image.shape == (20, 24, 3) and set(np.unique(labels)) == {0, 2}
    image, labels = load_item(items[0], with_labels=False)
    assert image.shape == (30, 40, 3) and labels is None


def test_index_skips_bad_files(train_root, tmp_path):
    bad = train_root / "Bad"
    good = save(bad / "XRay_ok_0001.npz", imgs=image2d(), gts=labels2d())
    truncated = bad / "XRay_trunc_0001.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    save(bad / "XRay_nogts_0001.npz", imgs=image2d())
    save(bad / "XRay_shape_0001.npz", imgs=image2d(30, 41), gts=labels2d())
    save(bad / "XRay_float_0001.npz", imgs=image2d(), gts=labels2d().astype(np.float32))
    save(bad / "XRay_dtype_0001.npz", imgs=image2d().astype(np.float32), gts=labels2d())
    save(bad / "3DBox_CT_flat.npz", imgs=image2d(), gts=labels2d())  # name says 3D
    (bad / "XRay_text_0001.npz").write_text("not a zip")
    lines, log = logger()
    items = build_index([train_root], cache_dir=tmp_path / "cache", log=log)
    skips = {Path(line.split(": ")[0][len("skip "):]).name: line for line in lines if line.startswith("skip ")}
    assert set(skips) == {
        "XRay_trunc_0001.npz", "XRay_nogts_0001.npz", "XRay_shape_0001.npz", "XRay_float_0001.npz",
        "XRay_dtype_0001.npz", "3DBox_CT_flat.npz", "XRay_text_0001.npz",
    }
    assert "truncated" in skips["XRay_trunc_0001.npz"]
    assert "missing key 'gts'" in skips["XRay_nogts_0001.npz"]
    assert "shape mismatch" in skips["XRay_shape_0001.npz"]
    assert "dtype" in skips["XRay_float_0001.npz"] and "dtype" in skips["XRay_dtype_0001.npz"]
    names = {Path(it.path).name for it in items}
    assert "XRay_ok_0001.npz" in names and "CT_AbdomenSet_0001.npz" in names
    assert len(items) == 3 + 4 + 1  # CT slices + the good 2D files + XRay_ok


def test_index_cache(train_root, eval_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_index([train_root, eval_root], cache_dir=cache, log=lambda s: None)
    files = list(cache.iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["version"] == data.INDEX_VERSION

    def no_scan(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "_scan_file", no_scan)
    lines, log = logger()
    assert build_index([train_root, eval_root], cache_dir=cache, log=log) == first
    assert any("from cache" in line for line in lines)
    assert any("2DBox_US_nogt.npz" in line for line in lines)  # skips are reported again

    # a changed file (new mtime) rebuilds
    touched = train_root / "XRay" / "XRay_chest_0001.npz"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="cache should have been used"):
        build_index([train_root, eval_root], cache_dir=cache, log=lambda s: None)
    monkeypatch.undo()
    assert build_index([train_root, eval_root], cache_dir=cache, log=lambda s: None) == first
    assert [p.name for p in cache.iterdir()] == [files[0].name]  # rewritten in place, no temp left


def test_index_real_cases(tmp_path):
    source = require_data()
    root = tmp_path / "real"
    names = ["2DBox_Microscopy_dsb2018-t1.npz", "3DBox_PET_sts002.npz"]
    for sub in ("imgs", "gts"):
        (root / sub).mkdir(parents=True)
        for name in names:
            if not (source / sub / name).is_file():
                pytest.skip(f"{source / sub / name} is absent")
            shutil.copy(source / sub / name, root / sub / name)
    items = build_index(root, cache_dir=tmp_path / "cache", log=lambda s: None)
    gts = np.load(root / "gts" / names[1])["gts"]
    fg = np.flatnonzero(gts.reshape(gts.shape[0], -1).any(1)).tolist()
    assert [it.z for it in items] == [None] + fg
    assert [it.modality for it in items] == ["Microscopy"] + ["PET"] * len(fg)
    image, labels = load_item(items[-1])
    assert image.shape == gts.shape[1:] + (3,) and np.array_equal(labels, gts[items[-1].z])
    sample = FinetuneDataset(items, size=128)[(len(items) - 1, 7)]
    assert sample["masks"].sum() > 0 and sample["modality"] == "PET"


# --------------------------------------------------------------------------- augmentation
def coordinate_image(h=48, w=64):
    """Channel 0 = column, channel 1 = row; labels = 1 + row * w + column (unique per pixel)."""
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([cols, rows, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
    return image, (1 + rows * w + cols).astype(np.int64)


def assert_consistent(image, labels, w=64, margin=3):
    """Every labelled pixel away from the border shows (about) the source coordinates its label names."""
    h = image.shape[0]
    inner = np.zeros(labels.shape, bool)
    inner[margin:h - margin, margin:labels.shape[1] - margin] = True
    valid = inner & (labels > 0) & (image[..., 2] == 200)  # fully inside the warped source
    assert valid.sum() > 50
    src_rows, src_cols = np.divmod(labels[valid] - 1, w)
    assert np.abs(image[..., 0][valid].astype(int) - src_cols).max() <= 1
    assert np.abs(image[..., 1][valid].astype(int) - src_rows).max() <= 1


def test_flips_move_label_with_pixel():
    image = np.zeros((7, 9, 3), np.uint8)
    labels = np.zeros((7, 9), np.int64)
    image[2, 3] = 255
    labels[2, 3] = 4
    for flip, where in ((hflip, (2, 5)), (vflip, (4, 3))):
        out, lab = flip(image, labels)
        assert out[where].tolist() == [255] * 3 and lab[where] == 4
        assert np.argwhere(lab).tolist() == [list(where)]
    out, lab = hflip(image, None)
    assert lab is None and out.flags.c_contiguous


def test_shift_scale_rotate_consistent():
    image, labels = coordinate_image()
    for seed in range(5):
        out, lab = shift_scale_rotate(image, labels, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert lab.shape == labels.shape and lab.dtype == np.int64
        assert set(np.unique(lab)) <= set(np.unique(labels)) | {0}  # nearest: no invented labels
        assert_consistent(out, lab)
    # a single bright, labelled pixel stays under its label (scale >= 1 so it is not dropped)
    image = np.zeros((41, 41, 3), np.uint8)
    image[10, 30] = 255
    labels = np.zeros((41, 41), np.int64)
    labels[10, 30] = 1
    out, lab = shift_scale_rotate(image, labels, np.random.default_rng(3), scale=0.0)
    assert lab.sum() == 1
    assert out[tuple(np.argwhere(lab)[0])].max() == out.max() > 0


def test_augment_modes():
    image, labels = coordinate_image()
    out, lab = augment(image, labels, np.random.default_rng(0), "none")
    assert out is image and lab is labels
    flips = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
    for seed in range(8):
        out, lab = augment(image, labels, np.random.default_rng(seed), "flips")
        assert any(np.array_equal(out, f) for f in flips)
        assert_consistent(out, lab)
        out, lab = augment(image, labels, np.random.default_rng(seed), "full")
        assert_consistent(out, lab)
        again = augment(image, labels, np.random.default_rng(seed), "full")
        assert np.array_equal(out, again[0]) and np.array_equal(lab, again[1])
    outs = {augment(image, labels, np.random.default_rng(s), "full")[0].tobytes() for s in range(8)}
    assert len(outs) > 2
    with pytest.raises(ValueError):
        augment(image, labels, np.random.default_rng(0), "heavy")


# --------------------------------------------------------------------------- sampler
def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_deterministic_and_epochs():
    a = take(ResumableSampler(10, seed=3), 30)
    assert a == take(ResumableSampler(10, seed=3), 30)
    assert a != take(ResumableSampler(10, seed=4), 30)
    for e in range(3):
        assert sorted(i for i, _ in a[10 * e:10 * (e + 1)]) == list(range(10))
    assert [i for i, _ in a[:10]] != [i for i, _ in a[10:20]]
    assert len({s for _, s in a}) == 30 and all(isinstance(s, int) and s >= 0 for _, s in a)


@pytest.mark.parametrize("n", [8, 7])
def test_sampler_ranks_partition(n):
    r0, r1 = ResumableSampler(n, 5, rank=0, world_size=2), ResumableSampler(n, 5, rank=1, world_size=2)
    assert r0.epoch_length == r1.epoch_length == (n + 1) // 2
    e0, e1 = take(r0, r0.epoch_length), take(r1, r1.epoch_length)
    idx0, idx1 = [i for i, _ in e0], [i for i, _ in e1]
    assert set(idx0) | set(idx1) == set(range(n))
    assert len(set(idx0) & set(idx1)) == (0 if n % 2 == 0 else 1)  # only the wrapped padding
    assert not {s for _, s in e0} & {s for _, s in e1}
    if n % 2 == 0:  # the same global position gets the same seed as in a single-rank run
        single = take(ResumableSampler(n, 5), n)
        assert single[0::2] == e0 and single[1::2] == e1


def test_sampler_resume():
    full = take(ResumableSampler(10, seed=1, world_size=2, rank=1), 23)
    first = ResumableSampler(10, seed=1, world_size=2, rank=1)
    head = take(first, 17)  # the iterator runs ahead (prefetch) ...
    assert first.state_dict() == {"epoch": 0, "position": 0}  # ... without moving the committed state
    first.advance(13)  # the loop consumed 13
    state = first.state_dict()
    assert state == first.state_at(13) == {"epoch": 2, "position": 3}
    resumed = ResumableSampler(10, seed=1, world_size=2, rank=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert head[:13] + take(resumed, 10) == full
    assert take(first, 10) == full[13:]  # a new iterator of the same sampler continues too
    end_of_epoch = ResumableSampler(10, seed=1, world_size=2, rank=1)
    end_of_epoch.load_state_dict({"epoch": 1, "position": 5})
    assert end_of_epoch.state_dict() == {"epoch": 2, "position": 0}
    assert take(end_of_epoch, 3) == full[10:13]
    with pytest.raises(ValueError):
        end_of_epoch.load_state_dict({"epoch": 0, "position": 6})


class _Echo(Dataset):
    def __getitem__(self, key):
        return torch.tensor(key[0])


def test_sampler_with_dataloader_resume():
    bs = 3
    sampler = ResumableSampler(7, seed=2)
    it = iter(DataLoader(_Echo(), sampler=sampler, batch_size=bs))
    stream = []
    for _ in range(6):
        stream.append(next(it).tolist())
        sampler.advance(bs)  # as the training loop does after each step
    checkpoint = sampler.state_at(4 * bs)  # what a checkpoint after 4 steps held
    resumed = ResumableSampler(7, seed=2)
    resumed.load_state_dict(checkpoint)
    it = iter(DataLoader(_Echo(), sampler=resumed, batch_size=bs))
    assert [next(it).tolist() for _ in range(2)] == stream[4:]
    assert sampler.state_dict() == sampler.state_at(6 * bs)


def test_modality_weights_balance():
    items = [Item(f"ct{i}", 0, "CT") for i in range(8)] + [Item(f"us{i}", None, "US") for i in range(2)]
    w = modality_weights(items)
    assert w.sum() == pytest.approx(1.0)
    assert w[:8].sum() == pytest.approx(w[8:].sum())
    sampler = ResumableSampler(len(items), seed=0, weights=w, epoch_size=4000)
    assert sampler.epoch_length == 4000
    share = np.mean([i >= 8 for i, _ in take(sampler, 4000)])
    assert 0.45 < share < 0.55
    assert modality_weights([]).shape == (0,)


# --------------------------------------------------------------------------- datasets
def test_letterbox_labels():
    labels = labels2d()  # 30 x 40 -> 48 x 64 in a 64 frame
    out = letterbox_labels(labels.astype(np.int64), 64)
    assert out.shape == (64, 64) and out.dtype == np.int64
    assert not out[48:].any() and set(np.unique(out)) == {0, 1, 2}


def test_finetune_dataset(train_root, tmp_path):
    items = build_index(train_root, cache_dir=tmp_path / "cache", log=lambda s: None)
    ds = FinetuneDataset(items, size=64, mask_num=4, box_jitter=3, augment="full")
    for index in range(len(items)):
        for seed in (0, 1, 2):
            sample = ds[(index, seed)]
            image, masks, boxes = sample["image"], sample["masks"], sample["boxes"]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert masks.shape == (4, 64, 64) and masks.dtype == torch.float32
            assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
            assert boxes.shape == (4, 4) and boxes.dtype == torch.float32
            assert (boxes >= 0).all() and (boxes <= 63).all()
            assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
            for mask, box in zip(masks.numpy(), boxes.numpy()):
                ys, xs = np.nonzero(mask)
                if ys.size:
                    assert box[0] <= xs.min() and xs.max() <= box[2]
                    assert box[1] <= ys.min() and ys.max() <= box[3]
            assert isinstance(sample["modality"], str)
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "masks", "boxes"))
    assert any(not torch.equal(ds[(1, s)]["image"], a["image"]) for s in range(6, 12))


def test_finetune_jitter_and_masks(train_root, tmp_path):
    items = [it for it in build_index(train_root, cache_dir=tmp_path / "c", log=lambda s: None) if it.z is None]
    jitter = 4
    ds = FinetuneDataset(items, size=64, mask_num=6, box_jitter=jitter, augment="none")
    shifts = set()
    for seed in range(10):
        sample = ds[(0, seed)]
        _, labels = load_item(items[0])
        small = letterbox_labels(labels, 64)
        tensor, _ = preprocess_image(load_item(items[0])[0], 64, "bilinear_u8")
        assert torch.equal(sample["image"], tensor[0])
        for mask, box in zip(sample["masks"].numpy(), sample["boxes"].numpy()):
            label = small[mask > 0][0]
            assert np.array_equal(mask > 0, small == label)  # the whole letterboxed object
            ys, xs = np.nonzero(mask)
            tight = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
            grow = np.array([tight[0] - box[0], tight[1] - box[1], box[2] - tight[2], box[3] - tight[3]])
            unclamped = grow[[box[0] > 0, box[1] > 0, box[2] < 63, box[3] < 63]]
            assert (grow >= 0).all() and (grow <= jitter).all()
            assert len(set(unclamped.tolist())) <= 1  # one shift on all sides
            shifts.update(unclamped.tolist())
    assert len(shifts) > 1


def test_finetune_empty_target(tmp_path):
    root = tmp_path / "tiny"
    gts = np.zeros((200, 200), np.uint8)
    gts[2, 2] = 1  # a single pixel the 64 letterbox never samples
    save(root / "Fundus" / "Fundus_x_1.npz", imgs=image2d(200, 200), gts=gts)
    items = build_index(root, cache_dir=tmp_path / "c", log=lambda s: None)
    sample = FinetuneDataset(items, size=64, mask_num=3, augment="none")[(0, 0)]
    assert sample["masks"].sum() == 0
    boxes = sample["boxes"]
    assert (boxes >= 0).all() and (boxes <= 63).all() and (boxes[:, :2] <= boxes[:, 2:]).all()


def test_distill_dataset(eval_root, tmp_path):
    items = build_index(eval_root, cache_dir=tmp_path / "cache", log=lambda s: None)
    ds = DistillDataset(items, student_size=64, teacher_size=32, augment="flips")
    for index in range(len(items)):
        image, _ = load_item(items[index])
        flips = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
        sample = ds[(index, 11)]
        assert sample["student"].shape == (3, 64, 64) and sample["teacher"].shape == (3, 32, 32)
        assert sample["student"].dtype == sample["teacher"].dtype == torch.float32
        for key in ("student", "teacher"):
            assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0
        assert sample["modality"] == items[index].modality
        # both views come from the same flipped image
        matches = [
            f for f in flips
            if torch.equal(preprocess_image(np.ascontiguousarray(f), 64, "bilinear_u8")[0][0], sample["student"])
        ]
        assert matches
        assert torch.equal(preprocess_image(np.ascontiguousarray(matches[0]), 32, "area")[0][0], sample["teacher"])
        again = ds[(index, 11)]
        assert torch.equal(again["student"], sample["student"]) and torch.equal(again["teacher"], sample["teacher"])
