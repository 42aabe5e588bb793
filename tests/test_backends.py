"""Exported backends (``models.export.backends``, ``--backend onnxruntime|openvino``) against torch fp32.

* Parity: every built-in model (LiteMedSAM: TinyViT at 256; MedficientSAM-L0/L1/L2: EfficientViT at
  512; MedSAM: ViT-B at 1024) with the reference seed-0 weights; the backend's embedding (batches of 1
  and 2) and low-res logits (1 and 4 boxes) against the torch model within the parity tests' bars
  (REL_TOL x std; IoU within IOU_TOL).  tests/test_zoo_e2e.py holds openvino's masks end to end
  against the upstream references, for every model.
* End to end: ``TorchSegmenter(..., backend=X)`` against ``backend="torch"`` with LiteMedSAM's
  released weights, on a real 2D and a real 3D case of the bundled demo set, on both execution
  paths (2D: identical or per-label Dice >= 0.999; 3D: per-label Dice >= 0.99).
* The export cache: made once, reused (no export, files untouched), a new key or new weights
  export again, atomic publication.

Exports go to a temporary folder (``HARNESS_CACHE_DIR`` is pointed there for the module).
"""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import harness.choices as choices
import models.export.backends as backends
import models.export.exporter as exporter
from models import build_model, load_weights
from harness.choices import EXPORT_BACKENDS
from models.export.backends import compile_backend, default_cache_dir
from models.weights.checkpoints import default_litemedsam_checkpoint
from models.hardware import cpu_bf16_support
from models.inference.pipelines import EXECUTION_PATHS, LITEMEDSAM_CVPR24
from models.nets.sam import MaskDecoder, PromptEncoder, TwoWayTransformer
from models.nets.promptable_sam import ModelInfo, PromptableSAM
from models.inference.segmenters import TorchSegmenter, file_sha256
from reference import IOU_TOL, REL_TOL, abs_dev, make_case_inputs, make_state_dict, rel_dev

pytestmark = pytest.mark.usefixtures("two_threads")

DEMO = Path(__file__).resolve().parents[1] / "harness" / "demo" / "imgs"
CASE_2D = "2DBox_Microscopy_dsb2018-t1"  # nuclei, 256 x 256: its first 6 boxes (see _load_case)
CASE_3D = "3DBox_CT_sts025"  # 15 x 138 x 149, one box: 5 of its slices (see _load_case)

SEEDED = {"litemedsam": "lite_medsam", "l0": "medficientsam_l0", "l1": "medficientsam_l1",
          "l2": "medficientsam_l2", "medsam": "medsam_vit_b"}


def _available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _require(*packages: str) -> None:
    missing = [p for p in packages if not _available(p)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'medsam-harness[backends]')")


def _backend_param(backend: str, *names: str):
    """``pytest.param(*names, backend)``, skipped with the reason when the backend is not installed; marked
    slow when it names a model (exporting a real encoder takes tens of seconds to minutes; the fast set
    exports a tiny model instead)."""
    missing = backends.missing_packages(backend)
    reason = f"backend {backend} needs {', '.join(missing)} (pip install 'medsam-harness[backends]')"
    marks = [pytest.mark.skipif(bool(missing), reason=reason)]
    if names:
        marks.append(pytest.mark.slow)
    return pytest.param(*names, backend, marks=marks, id="-".join((*names, backend)))


BACKEND_PARAMS = [_backend_param(b) for b in EXPORT_BACKENDS]
# openvino (the default backend, --backend auto) for every model; onnxruntime for one model of each
# encoder family (it converts the same ONNX graphs).
PARITY = [_backend_param(b, name) for name in SEEDED for b in (EXPORT_BACKENDS if name in ("litemedsam", "l0") else ("openvino",))]


@pytest.fixture(scope="module")
def export_root(export_cache_env):
    """The exports folder of the session's export cache (HARNESS_CACHE_DIR for the module)."""
    return export_cache_env / "exports"


@pytest.fixture(scope="module")
def seeded_models(two_threads):
    """name -> (model with the reference seed-0 weights, 2 images, their torch fp32 embeddings)."""
    built = {}

    def get(name):
        if name not in built:
            model = build_model(name)
            model.load_state_dict(make_state_dict(SEEDED[name], 0), strict=True)
            images = _images(model.info.input_size, (0, 1))
            with torch.no_grad():
                built[name] = (model.eval(), images, model.image_encoder(images))
        return built[name]

    return get


@pytest.fixture(scope="module")
def litemedsam_real(two_threads):
    try:
        path = default_litemedsam_checkpoint()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model = build_model("litemedsam")
    load_weights(model, path)
    return model.eval(), str(path)


def _images(input_size: int, seeds) -> torch.Tensor:
    """(len(seeds), 3, S, S) encoder inputs in [0, 1] from the reference input generator."""
    return torch.cat([torch.from_numpy(make_case_inputs(s, input_size)[0].astype(np.float32) / np.float32(255))
                      for s in seeds])


def _boxes(input_size: int, prompt_size: int, count: int) -> torch.Tensor:
    """``count`` reference boxes (3 per seed), rescaled from the input frame to the prompt frame."""
    rows = np.concatenate([make_case_inputs(s, input_size)[1] for s in range(10, 10 + (count + 2) // 3)])[:count]
    return torch.from_numpy(rows.astype(np.float32) * np.float32(prompt_size / input_size))


# ============================================================================ parity with torch fp32
@pytest.mark.parametrize("name, backend", PARITY)
def test_backend_matches_torch(name, backend, seeded_models, export_root):
    model, images, expected = seeded_models(name)
    size, prompt = model.info.input_size, model.info.prompt_size
    executor = compile_backend(backend, model, size, cache_key=f"{name}-seed0", cache_dir=export_root)
    assert executor.info == model.info and executor.backend == backend and executor.threads == 2
    with torch.inference_mode():  # as the engine calls it
        single = executor.image_encoder(images[:1])
        kept = single.clone()
        batch = executor.image_encoder(images)
    # every call returns its own arrays: a later call does not overwrite an earlier result
    assert torch.equal(single, kept)
    assert single.dtype == batch.dtype == torch.float32
    assert tuple(single.shape) == (1, 256, 64, 64) and tuple(batch.shape) == (2, 256, 64, 64)
    assert rel_dev(single, expected[:1].numpy()) <= REL_TOL, rel_dev(single, expected[:1].numpy())
    assert rel_dev(batch, expected.numpy()) <= REL_TOL, rel_dev(batch, expected.numpy())

    embedding = expected[1:2].clone()
    for count in (1, 4):
        boxes = _boxes(size, prompt, count)
        with torch.no_grad():
            ref_low, ref_iou = model.decode_boxes(embedding, boxes)
        with torch.inference_mode():
            low, iou = executor.decode_boxes(embedding, boxes)
        assert tuple(low.shape) == (count, 1, 256, 256) and tuple(iou.shape) == (count, 1)
        assert rel_dev(low, ref_low.numpy()) <= REL_TOL, (count, rel_dev(low, ref_low.numpy()))
        assert abs_dev(iou, ref_iou.numpy()) <= IOU_TOL, (count, abs_dev(iou, ref_iou.numpy()))



@pytest.mark.slow  # exports and compiles LiteMedSAM (shared with its parity test when both run)
def test_openvino_precision_is_explicit(seeded_models, export_root):
    """fp32 compiles both graphs with an f32 precision hint (OpenVINO's CPU default is bf16 on AMX
    CPUs); bf16 only the encoder, which then stays close to the fp32 embedding."""
    _require("openvino", "onnx", "onnxscript")
    import openvino as ov

    model, images, expected = seeded_models("litemedsam")
    fp32 = compile_backend("openvino", model, 256, cache_key="litemedsam-seed0", cache_dir=export_root)
    for graph in (fp32._encoder, fp32._decoder):
        assert graph.property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert int(graph.property("INFERENCE_NUM_THREADS")) == 2
    if not cpu_bf16_support():
        with pytest.raises(ValueError, match="bf16"):
            compile_backend("openvino", model, 256, precision="bf16", cache_key="litemedsam-seed0",
                            cache_dir=export_root)
        return
    bf16 = compile_backend("openvino", model, 256, precision="bf16", cache_key="litemedsam-seed0",
                           cache_dir=export_root)
    assert not bf16.exported  # the IR is precision-independent: same cache folder
    assert bf16._encoder.property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert bf16._decoder.property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    with torch.inference_mode():
        exact, approx = fp32.image_encoder(images[:1]), bf16.image_encoder(images[:1])
    assert not torch.equal(exact, approx)  # bf16 really ran
    cosine = torch.nn.functional.cosine_similarity(exact.flatten(), approx.flatten(), dim=0)
    assert cosine > 0.99, float(cosine)


def _resident_kb(path: Path) -> int:
    """This process's resident kB of the mappings of file ``path`` (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_release_mapped_pages(tmp_path):
    """Read-only mappings of the file lose their resident pages and still read the same bytes;
    a writable mapping (and its unsaved change) is left alone."""
    import mmap

    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    copy_path = tmp_path / "copy.bin"
    copy_path.write_bytes(data)
    with path.open("rb") as f, copy_path.open("r+b") as g:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        rw = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_WRITE)
        assert ro[:] == data and rw[:] == data  # every page touched
        rw[0] = (data[0] + 1) % 256
        assert _resident_kb(path) >= 8 << 10
        assert backends.release_mapped_pages(path) >= len(data)
        assert _resident_kb(path) < 1 << 10
        assert ro[:] == data  # faults back in, unchanged
        assert backends.release_mapped_pages(copy_path) == 0
        assert _resident_kb(copy_path) >= 8 << 10 and rw[0] == (data[0] + 1) % 256
        ro.close()
        rw.close()
    assert backends.release_mapped_pages(tmp_path / "absent.bin") == 0


@pytest.mark.slow  # exports and compiles L0
def test_openvino_releases_the_ir_weights_pages(seeded_models, export_root):
    """After compiling, the IR's weights file is not counted twice in RSS: its mapped pages are given
    back (:func:`runtime.graphs.release_mapped_pages`); the plugin keeps its repacked copy, and
    the graph still computes the torch embedding."""
    _require("openvino", "onnx", "onnxscript")
    model, images, expected = seeded_models("l0")
    exported = compile_backend("openvino", model, 512, cache_key="l0-seed0", cache_dir=export_root)
    weights = exported.folder / "encoder.bin"
    assert exported._encoder.released_bytes >= weights.stat().st_size
    assert _resident_kb(weights) < weights.stat().st_size // 1024 // 2
    with torch.inference_mode():
        embedding = exported.image_encoder(images[:1])
    assert rel_dev(embedding, expected[:1].numpy()) <= REL_TOL, rel_dev(embedding, expected[:1].numpy())


# ============================================================================ end to end
def _load_case(name: str):
    """A real demo case, made small: the 2D case's first 6 boxes; the 3D case's slices 5-9 with its
    box's z range set to them (5 slices to propagate through; the fast path encodes them as 4 + 1)."""
    with np.load(DEMO / f"{name}.npz") as npz:
        imgs, boxes = npz["imgs"], npz["boxes"]
    if name.startswith("2D"):
        return imgs, boxes[:6]
    boxes = boxes.copy()
    boxes[:, 2], boxes[:, 5] = 0, 4
    return np.ascontiguousarray(imgs[5:10]), boxes


def _assert_same_masks(got: np.ndarray, ref: np.ndarray, min_dice: float, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.uint16, what
    labels = sorted((set(np.unique(ref).tolist()) | set(np.unique(got).tolist())) - {0})
    assert labels, f"{what}: the torch run segmented nothing"
    dice = {}
    for label in labels:
        a, b = got == label, ref == label
        dice[label] = 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    worst = min(dice, key=dice.get)
    assert dice[worst] >= min_dice, f"{what}: label {worst} Dice {dice[worst]:.5f} < {min_dice}"


@pytest.fixture(scope="module")
def torch_segs(litemedsam_real):
    """LiteMedSAM (released weights) segs of the two cases on both paths, torch backend."""
    model, weights = litemedsam_real
    out = {}
    for path in EXECUTION_PATHS:
        # a copy: the torch fast path rewrites its model in place (BatchNorm folding)
        seg = TorchSegmenter("litemedsam", copy.deepcopy(model), LITEMEDSAM_CVPR24, weights, path=path)
        for case in (CASE_2D, CASE_3D):
            out[path, case] = seg.engine.segment(*_load_case(case))
            assert len(np.unique(out[path, case])) == (7 if case == CASE_2D else 2), (path, case)  # all labels
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_segmenter_backend_same_masks_as_torch(backend, litemedsam_real, torch_segs, export_root):
    model, weights = litemedsam_real
    fingerprint = backends.model_fingerprint(model)
    for path in EXECUTION_PATHS:
        original = copy.deepcopy(model)
        seg = TorchSegmenter("litemedsam", original, LITEMEDSAM_CVPR24, weights, path=path, backend=backend)
        # exported as loaded (the cache folder's fingerprint is the loaded weights'), then released
        assert seg.engine.model.folder.name.endswith(fingerprint[:16])
        assert seg.model is original and all(p.is_meta for p in original.parameters())
        facts = seg.describe()
        assert facts["params"] == 9_791_300 and 38e9 < facts["flops"] < 41e9 and facts["backend"] == backend
        executor = seg.engine.model
        assert executor.backend == backend and seg.engine.config.path == path
        # TorchSegmenter keys the cache by the weights' sha256, under $HARNESS_CACHE_DIR/exports
        assert executor.folder.parent == export_root / f"litemedsam-{file_sha256(weights)}"
        for case in (CASE_2D, CASE_3D):
            segs = seg.engine.segment(*_load_case(case))
            ref = torch_segs[path, case]
            what = f"{backend} {path} {case}"
            if case.startswith("2D"):
                if not np.array_equal(segs, ref):
                    _assert_same_masks(segs, ref, 0.999, what)
            else:
                _assert_same_masks(segs, ref, 0.99, what)
        stats = seg.engine.stats
        # one call per 2D box (the fast path's default decoder batch is 1), then one per slice; one
        # image or slice per encoder call
        assert stats.decoder_calls == 6 + 5 and stats.encoder_batches == [1] * 6, stats


# ============================================================================ the cache
def _tiny_model(seed: int) -> PromptableSAM:
    """A small PromptableSAM (conv encoder, one-block decoder) with the real interfaces: cheap to export."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(3, 256, kernel_size=4, stride=4), nn.GELU())
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=256,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=256, num_heads=2, mlp_dim=32),
                          num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16)
    return PromptableSAM(encoder, prompt_encoder, decoder, ModelInfo("tiny", 256, 256)).eval()


def _files(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.slow  # three exports and two conversions, each in a fresh Python process
def test_export_cache_reused_and_keyed(tmp_path, monkeypatch):
    _require("onnxruntime", "openvino", "onnx", "onnxscript")
    model = _tiny_model(0)
    image = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        expected = model.image_encoder(image)
    first = {}
    for backend in EXPORT_BACKENDS:  # openvino converts the ONNX export that onnxruntime made: one export
        executor = compile_backend(backend, model, 256, cache_key="tiny-a", cache_dir=tmp_path)
        assert executor.exported and executor.folder.is_dir() and executor.folder.parent == tmp_path / "tiny-a"
        assert f"-256px-v{backends.EXPORT_FORMAT_VERSION}-" in executor.folder.name
        with torch.inference_mode():
            assert rel_dev(executor.image_encoder(image), expected.numpy()) <= REL_TOL, backend
        first[backend] = (executor.folder, _files(executor.folder))
    assert {f.name.split("-")[0] for f, _ in first.values()} == {"onnx", "openvino"}
    assert all("manifest.json" in files for _, files in first.values())
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary folder left behind

    def no_export(*args, **kwargs):
        raise AssertionError("exported although the cache holds the graphs")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    monkeypatch.setattr(backends, "convert_openvino", no_export)
    for backend in EXPORT_BACKENDS:
        again = compile_backend(backend, model, 256, cache_key="tiny-a", cache_dir=tmp_path)
        assert not again.exported and again.folder == first[backend][0]
        assert _files(again.folder) == first[backend][1]  # nothing rewritten
        with torch.inference_mode():
            assert rel_dev(again.image_encoder(image), expected.numpy()) <= REL_TOL, backend
    monkeypatch.undo()

    other_key = compile_backend("onnxruntime", model, 256, cache_key="tiny-b", cache_dir=tmp_path)
    assert other_key.exported and other_key.folder.parent == tmp_path / "tiny-b"
    # same key, other weights: another fingerprint, so another folder (a key that does not identify
    # the weights, as when the segmenter falls back to the weights' path, cannot serve stale graphs)
    targets = []

    def record(model, input_size, out):
        targets.append(out)
        raise RuntimeError("export wanted")

    monkeypatch.setattr(backends, "export_onnx", record)
    with pytest.raises(RuntimeError, match="export wanted"):
        compile_backend("onnxruntime", _tiny_model(1), 256, cache_key="tiny-a", cache_dir=tmp_path)
    monkeypatch.undo()
    assert len(targets) == 1 and targets[0].parent == tmp_path / "tiny-a"  # the temporary folder
    assert targets[0].name.startswith(f".onnx-256px-v{backends.EXPORT_FORMAT_VERSION}-")
    assert not targets[0].name.startswith(f".{first['onnxruntime'][0].name}")
    assert backends.model_fingerprint(_tiny_model(1)) != backends.model_fingerprint(model)
    assert backends.model_fingerprint(_tiny_model(0)) == backends.model_fingerprint(model)
    assert not list(tmp_path.rglob(".*.tmp"))  # the failed export left nothing
    for folder, files in first.values():
        assert _files(folder) == files

    # a damaged cached graph is reported with its file, not silently used
    onnx_folder = first["onnxruntime"][0]
    (onnx_folder / "decoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(RuntimeError, match=r"decoder\.onnx: onnxruntime cannot load the cached graph"):
        compile_backend("onnxruntime", model, 256, cache_key="tiny-a", cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "exports"
    monkeypatch.delenv("HARNESS_CACHE_DIR")
    assert default_cache_dir() == Path("~/.cache/medsam-harness/exports").expanduser()


def test_publication_is_atomic(tmp_path):
    """A folder appears complete or not at all; a failed build leaves nothing; when another process
    publishes the same folder first, that one is used."""
    target = tmp_path / "key" / "onnx-256px-v1-x"

    def failing(tmp):
        (tmp / "encoder.onnx").write_bytes(b"half")
        assert not target.exists()  # built under a temporary name
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        backends._ensure_folder(target, failing, "key")
    assert not target.exists() and not list(tmp_path.rglob(".*.tmp"))

    def racing(tmp):  # another process renames its complete folder into place meanwhile
        target.mkdir()
        (target / "encoder.onnx").write_bytes(b"theirs")
        (target / "manifest.json").write_text('{"files": ["encoder.onnx"]}')
        (tmp / "encoder.onnx").write_bytes(b"ours")
        return {}

    assert backends._ensure_folder(target, racing, "key") is False
    assert (target / "encoder.onnx").read_bytes() == b"theirs" and not list(tmp_path.rglob(".*.tmp"))
    assert backends._ensure_folder(target, failing, "key") is False  # exists: nothing is built

    (target / "encoder.onnx").unlink()  # damaged by hand
    with pytest.raises(RuntimeError, match="incomplete"):
        backends._ensure_folder(target, failing, "key")


def _run_script(tmp_path: Path, body: str) -> str:
    """Run ``body`` as a fresh script (its own ``__main__``; ``sys.argv[1]`` = ``tmp_path``), with torch,
    ``compile_backend`` and this module's ``_tiny_model`` imported; return its stdout."""
    head = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import torch\n"
            "from test_backends import _tiny_model\n"
            "from models.export.backends import compile_backend\n")
    done = subprocess.run([sys.executable, "-c", head + body, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # a fresh Python process exports to ONNX and OpenVINO
def test_export_runs_in_a_child_process(tmp_path):
    """The exporter never enters the harness's process (it keeps its memory: models/export/exporter.py
    _run_job); the child's errors come back as RuntimeError naming what failed."""
    _require("openvino", "onnx", "onnxscript")
    stdout = _run_script(tmp_path, "ex = compile_backend('openvino', _tiny_model(0), 256, cache_key='tiny', "
                                   "cache_dir=sys.argv[1])\n"
                                   "assert ex.exported\n"
                                   "print(sorted(m for m in ('onnx', 'onnxscript') if m in sys.modules))\n")
    assert stdout.strip().splitlines()[-1] == "[]"
    assert {p.name.split("-")[0] for p in (tmp_path / "tiny").iterdir()} == {"onnx", "openvino"}

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match=r"missing/encoder.onnx: converting to OpenVINO IR failed"):
        exporter._run_job("openvino", out, onnx_dir=str(tmp_path / "missing"))
    assert not list(tmp_path.glob(".job-*"))  # the job's folder is gone


@pytest.mark.slow  # a fresh Python process exports to ONNX
def test_model_of_a_main_script_exports_in_this_process(tmp_path):
    """A model class defined in the running script (``__main__``) pickles, but the child cannot import
    it: the export then runs in the script's own process."""
    _require("onnxruntime", "onnx", "onnxscript")
    stdout = _run_script(tmp_path, "from models.nets.promptable_sam import PromptableSAM\n"
                                   "class MainSAM(PromptableSAM):\n"
                                   "    pass\n"
                                   "model = _tiny_model(0)\n"
                                   "model.__class__ = MainSAM\n"
                                   "ex = compile_backend('onnxruntime', model, 256, cache_key='main', "
                                   "cache_dir=sys.argv[1])\n"
                                   "x = torch.rand(1, 3, 256, 256)\n"
                                   "with torch.no_grad():\n"
                                   "    ref = model.image_encoder(x)\n"
                                   "print(ex.exported, float((ex.image_encoder(x) - ref).abs().max() / ref.std()))\n")
    exported, deviation = stdout.split()[-2:]
    assert exported == "True" and float(deviation) <= REL_TOL, stdout


def test_export_process_that_dies_is_reported(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="the openvino export process exited with status 1 and no result"):
        exporter._run_job("openvino", out, onnx_dir=str(tmp_path))


def test_unpicklable_model_exports_in_this_process(tmp_path):
    """A model the child cannot receive (its class is local to a function) is exported here."""
    _require("onnxruntime", "onnx", "onnxscript")

    class LocalSAM(PromptableSAM):
        pass

    model = _tiny_model(0)
    model.__class__ = LocalSAM
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = model.image_encoder(image)
    executor = compile_backend("onnxruntime", model, 256, cache_key="local", cache_dir=tmp_path)
    assert executor.exported
    with torch.inference_mode():
        assert rel_dev(executor.image_encoder(image), expected.numpy()) <= REL_TOL


# ============================================================================ errors
def test_unknown_backend_and_precision_errors(tmp_path):
    model = _tiny_model(0)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        compile_backend("tensorrt", model, 256, cache_key="k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="torch backend runs the model itself"):
        compile_backend("torch", model, 256, cache_key="k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        compile_backend("openvino", model, 256, precision="fp16", cache_key="k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="tiny: precision bf16 is not supported with the onnxruntime backend"):
        compile_backend("onnxruntime", model, 256, precision="bf16", cache_key="k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="tiny takes 256px input, not 512px"):
        compile_backend("onnxruntime", model, 512, cache_key="k", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing exported


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
def test_missing_package_errors(backend, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import <backend>` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install {backend}.*medsam-harness\[backends\]"):
        compile_backend(backend, _tiny_model(0), 256, cache_key="k", cache_dir=tmp_path)


@pytest.mark.skipif(not _available("onnxruntime"), reason="onnxruntime is not installed (pip install onnxruntime)")
def test_missing_exporter_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match="pip install onnxscript"):
        compile_backend("onnxruntime", _tiny_model(0), 256, cache_key="k", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.onnx"))


# ============================================================================ --backend auto (the default)
def test_auto_picks_openvino_on_the_fast_path_when_installed(monkeypatch):
    from harness.choices import resolve_backend

    for explicit in ("torch", "onnxruntime", "openvino"):  # a named backend is used as named
        assert resolve_backend(explicit, "faithful") == explicit
    monkeypatch.setattr(choices, "missing_packages", lambda backend: [])
    assert resolve_backend("auto", "fast") == "openvino"
    assert resolve_backend("auto", "faithful") == "torch"  # the reference path stays on our torch code
    assert resolve_backend("auto", "fast", "cuda:0") == "torch"  # openvino runs here on the CPU only
    monkeypatch.setattr(choices, "missing_packages", lambda backend: ["openvino"])
    assert resolve_backend("auto", "fast") == "torch"


def test_auto_names_entries_by_what_ran(monkeypatch, tmp_path):
    """Untagged = the defaults on this machine; the faithful path is [faithful] alone (it runs torch
    under auto); a fast torch run beside an openvino default is [torch]."""
    from harness.pluginmanager import HarnessPlugins
    from harness.choices import entry_name, resolved_backend
    from harness.run import RunConfig

    spec = HarnessPlugins().get("litemedsam")
    base = dict(models=["litemedsam"], data_dir=tmp_path, out_dir=tmp_path)
    monkeypatch.setattr(choices, "missing_packages", lambda backend: [])
    assert resolved_backend(RunConfig(**base)) == "openvino"
    names = {b: entry_name(spec, RunConfig(**base, backend=b)) for b in ("auto", "openvino", "torch", "onnxruntime")}
    assert names == {"auto": "litemedsam", "openvino": "litemedsam", "torch": "litemedsam[torch]",
                     "onnxruntime": "litemedsam[onnxruntime]"}
    assert entry_name(spec, RunConfig(**base, path="faithful")) == "litemedsam[faithful]"
    assert entry_name(spec, RunConfig(**base, path="faithful", backend="openvino")) == "litemedsam[faithful,openvino]"
    monkeypatch.setattr(choices, "missing_packages", lambda backend: ["openvino"])
    assert resolved_backend(RunConfig(**base)) == "torch"
    assert entry_name(spec, RunConfig(**base)) == entry_name(spec, RunConfig(**base, backend="torch")) == "litemedsam"


def test_auto_falls_back_to_torch_when_the_export_fails(monkeypatch, seeded_models):
    """``auto`` never costs a run its model: a failed export warns and runs torch (and says so in
    describe()); a backend the user named raises."""
    model, _, _ = seeded_models("litemedsam")
    monkeypatch.setattr(choices, "missing_packages", lambda backend: [])

    def broken(*args, **kwargs):
        raise RuntimeError("exporting the encoder to ONNX failed: unsupported op")

    monkeypatch.setattr(backends, "compile_backend", broken)
    with pytest.warns(RuntimeWarning, match="openvino backend is unavailable.*running on torch"):
        seg = TorchSegmenter("litemedsam", copy.deepcopy(model), LITEMEDSAM_CVPR24, "seed0", path="fast", backend="auto")
    assert seg.backend == "torch" and seg.engine.model is seg.model
    facts = seg.describe()
    assert facts["backend"] == "torch" and "unsupported op" in facts["backend_fallback"]
    with pytest.raises(RuntimeError, match="unsupported op"):
        TorchSegmenter("litemedsam", copy.deepcopy(model), LITEMEDSAM_CVPR24, "seed0", path="fast", backend="openvino")
